package convert

import (
	"io"

	"github.com/containerd/stargz-snapshotter/estargz"
	kgzip "github.com/klauspost/compress/gzip"
)

// fastGzip is estargz's gzip compression with klauspost's encoder for the
// chunks. The output is ordinary gzip that every eStargz reader opens; the
// encoder is about twice as fast as the standard library's at the same
// level, which is most of the time a conversion takes. The TOC and footer
// are still written by estargz itself so the format stays the reference's.
type fastGzip struct {
	*estargz.GzipCompressor
	estargz.GzipDecompressor
	level int
}

func newFastGzip(level int) *fastGzip {
	return &fastGzip{GzipCompressor: estargz.NewGzipCompressorWithLevel(level), level: level}
}

func (f *fastGzip) Writer(w io.Writer) (estargz.WriteFlushCloser, error) {
	return kgzip.NewWriterLevel(w, f.level)
}

// fastGunzip decompresses source layers with klauspost's decoder.
func fastGunzip(r io.Reader) (io.ReadCloser, error) { return kgzip.NewReader(r) }
