// Package inspect reports what the layers of an image are: their format,
// sizes, and for lazily mountable layers whether the TOC matches the
// manifest's annotation and what the TOC holds. It reads a layer's footer and
// TOC only, with ranged reads, never a whole layer.
package inspect

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"strconv"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/starling-dev/starling/pkg/convert"
)

// Formats of a layer.
const (
	FormatEStargz      = "eStargz"
	FormatZstdChunked  = "zstd:chunked"
	FormatGzip         = "gzip"
	FormatZstd         = "zstd"
	FormatUncompressed = "uncompressed"
	FormatOther        = "other"
)

// maxTOCSize bounds how much of a blob is read as its TOC, so a hostile
// footer cannot make us read gigabytes.
const maxTOCSize = 256 << 20

// Layer describes one layer.
type Layer struct {
	Index            int    `json:"index"`
	Digest           string `json:"digest"`
	MediaType        string `json:"media_type"`
	Format           string `json:"format"`
	Size             int64  `json:"size"`
	UncompressedSize int64  `json:"uncompressed_size"` // -1: not known without reading the layer
	// TOCDigestAnnotation is what the manifest says the TOC digest is.
	TOCDigestAnnotation string `json:"toc_digest_annotation,omitempty"`
	// TOCDigest is the digest of the TOC found in the blob.
	TOCDigest string `json:"toc_digest,omitempty"`
	// TOCMatch is set for lazily mountable layers: whether the two agree.
	TOCMatch *bool `json:"toc_match,omitempty"`
	Entries  int   `json:"entries,omitempty"`
	Chunks   int   `json:"chunks,omitempty"`
	// PrefetchSize is the compressed size of the prioritized region: the
	// offset of the prefetch landmark, 0 when the layer says there is none.
	PrefetchSize int64  `json:"prefetch_size"`
	Landmark     string `json:"landmark,omitempty"` // "prefetch", "no-prefetch" or ""
	Error        string `json:"error,omitempty"`
}

// Inspect describes a layer from its descriptor and random access to its
// blob. The TOC is returned for lazily mountable layers.
func Inspect(index int, desc v1.Descriptor, blob io.ReaderAt) (Layer, *estargz.JTOC) {
	l := Layer{
		Index:            index,
		Digest:           desc.Digest.String(),
		MediaType:        string(desc.MediaType),
		Size:             desc.Size,
		UncompressedSize: -1,
	}
	if v, ok := desc.Annotations[convert.UncompressedSizeAnnotation]; ok {
		if n, err := strconv.ParseInt(v, 10, 64); err == nil {
			l.UncompressedSize = n
		}
	}
	l.TOCDigestAnnotation = desc.Annotations[convert.TOCDigestAnnotation]

	var dec estargz.Decompressor
	switch desc.MediaType {
	case types.OCILayer, types.DockerLayer, "application/vnd.oci.image.layer.v1.tar+gzip+estargz":
		l.Format = FormatGzip
		dec = new(estargz.GzipDecompressor)
	case types.OCILayerZStd:
		l.Format = FormatZstd
		dec = new(zstdchunked.Decompressor)
	case types.OCIUncompressedLayer, types.DockerUncompressedLayer:
		l.Format = FormatUncompressed
		l.UncompressedSize = desc.Size
		return l, nil
	default:
		l.Format = FormatOther
		return l, nil
	}
	toc, tocDigest, err := ReadTOC(blob, desc.Size, dec)
	if err != nil {
		if l.TOCDigestAnnotation != "" {
			// The manifest says this is lazy but the blob disagrees.
			f := false
			l.TOCMatch = &f
			l.Error = err.Error()
		}
		return l, nil
	}
	if l.Format == FormatGzip {
		l.Format = FormatEStargz
	} else {
		l.Format = FormatZstdChunked
	}
	l.TOCDigest = tocDigest
	match := tocDigest == l.TOCDigestAnnotation
	l.TOCMatch = &match
	for _, e := range toc.Entries {
		switch e.Type {
		case "chunk":
			l.Chunks++
			continue
		case "reg":
			if e.Size > 0 {
				l.Chunks++
			}
		}
		l.Entries++
		switch e.Name {
		case estargz.PrefetchLandmark:
			l.Landmark = "prefetch"
			l.PrefetchSize = e.Offset
		case estargz.NoPrefetchLandmark:
			l.Landmark = "no-prefetch"
		}
	}
	return l, toc
}

// ReadTOC reads a lazily mountable blob's footer and TOC, in two ranged reads.
func ReadTOC(blob io.ReaderAt, size int64, dec estargz.Decompressor) (*estargz.JTOC, string, error) {
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
