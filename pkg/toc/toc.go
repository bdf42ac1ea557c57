// Package toc reads and checks the table of contents of lazily mountable
// (eStargz, zstd:chunked) layers.
//
// Load reads a blob's footer and TOC once, decompresses the TOC within a
// hard bound, and builds an Index while it decodes: a tree of entries with
// hard links resolved and the chunks of each regular file, everything
// validated before anything is mounted. A TOC that estargz's reader would
// panic on, run out of memory on, or resolve outside the layer is refused
// with one error that names the entry (an *EntryError matching ErrInvalid,
// and ErrEscapes for names that leave the layer). Validation is iterative
// and costs time and memory in proportion to the TOC, never to the sizes
// it claims.
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
// Load supersedes it: Read's decompression of the TOC is not bounded.
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
		return escapes("absolute name")
	}
	for rest := n; rest != ""; {
		var part string
		part, rest, _ = strings.Cut(rest, "/")
		if part == ".." {
			return escapes("name with \"..\"")
		}
	}
	if strings.IndexByte(n, 0) >= 0 {
		return escapes("name with a NUL byte")
	}
	return nil
}
