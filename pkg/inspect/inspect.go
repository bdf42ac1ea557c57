// Package inspect reports what the layers of an image are: their format,
// sizes, and for lazily mountable layers whether the TOC matches the
// manifest's annotation and what the TOC holds. It reads a layer's footer and
// TOC only, with ranged reads, never a whole layer.
package inspect

import (
	"io"
	"strconv"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/starling-dev/starling/pkg/convert"
	tocpkg "github.com/starling-dev/starling/pkg/toc"
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
	toc, tocDigest, err := tocpkg.Read(blob, desc.Size, dec)
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
