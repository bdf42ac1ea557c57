// Package toc reads and checks the table of contents of lazily mountable
// (eStargz, zstd:chunked) layers.
package toc

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/containerd/stargz-snapshotter/estargz"
)

// maxTOCSize bounds how much of a blob is read as its TOC, so a hostile
// footer cannot make us read gigabytes.
const maxTOCSize = 256 << 20

// Read reads a lazily mountable blob's footer and TOC, in two ranged reads.
func Read(blob io.ReaderAt, size int64, dec estargz.Decompressor) (*estargz.JTOC, string, error) {
	fsize := dec.FooterSize()
	if size < fsize {
		return nil, "", errors.New("blob smaller than a footer")
	}
	footer := make([]byte, fsize)
	if _, err := blob.ReadAt(footer, size-fsize); err != nil && !errors.Is(err, io.EOF) {
		return nil, "", fmt.Errorf("read footer: %w", err)
	}
	_, tocOff, tocSize, err := dec.ParseFooter(footer)
	if err != nil {
		return nil, "", fmt.Errorf("parse footer: %w", err)
	}
	if tocSize <= 0 {
		tocSize = size - tocOff - fsize
	}
	if tocOff < 0 || tocSize <= 0 || tocOff+tocSize > size || tocSize > maxTOCSize {
		return nil, "", fmt.Errorf("footer names TOC at %d+%d in a %d byte blob", tocOff, tocSize, size)
	}
	buf := make([]byte, tocSize)
	if _, err := blob.ReadAt(buf, tocOff); err != nil && !errors.Is(err, io.EOF) {
		return nil, "", fmt.Errorf("read TOC: %w", err)
	}
	toc, dgst, err := dec.ParseTOC(bytes.NewReader(buf))
	if err != nil {
		return nil, "", fmt.Errorf("parse TOC: %w", err)
	}
	return toc, dgst.String(), nil
}

// Validate refuses a TOC with an entry that would resolve outside the layer:
// an absolute name, a name that climbs with "..", or a hardlink to such a
// name. The reference reader cleans such names silently; a layer that has
// them is broken or hostile, and must not be mounted at all.
func Validate(t *estargz.JTOC) error {
	for _, e := range t.Entries {
		if err := checkName(e.Name); err != nil {
			return fmt.Errorf("TOC entry %q: %w", e.Name, err)
		}
		if e.Type == "hardlink" {
			if err := checkName(e.LinkName); err != nil {
				return fmt.Errorf("TOC entry %q: hardlink target %q: %w", e.Name, e.LinkName, err)
			}
		}
	}
	return nil
}

// ErrEscapes marks a name that leaves the layer's root.
var ErrEscapes = errors.New("resolves outside the layer")

func checkName(n string) error {
	if strings.HasPrefix(n, "/") {
		return fmt.Errorf("absolute name %w", ErrEscapes)
	}
	for _, part := range strings.Split(n, "/") {
		if part == ".." {
			return fmt.Errorf("name with \"..\" %w", ErrEscapes)
		}
	}
	if strings.ContainsRune(n, 0) {
		return fmt.Errorf("name with a NUL byte %w", ErrEscapes)
	}
	return nil
}
