// Package toctest crafts lazily mountable blobs, valid and hostile, for
// tests of the packages that read them, and checks the invariants of an
// index.
package toctest

import (
	"archive/tar"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	digest "github.com/opencontainers/go-digest"
)

// Format is a lazily mountable layer format.
type Format int

const (
	Gzip Format = iota // eStargz
	Zstd               // zstd:chunked
)

func (f Format) String() string {
	if f == Zstd {
		return "zstd:chunked"
	}
	return "estargz"
}

// MediaType is the OCI media type of a layer of the format.
func (f Format) MediaType() string {
	if f == Zstd {
		return "application/vnd.oci.image.layer.v1.tar+zstd"
	}
	return "application/vnd.oci.image.layer.v1.tar+gzip"
}

// Decompressor is estargz's decompressor of the format.
func (f Format) Decompressor() estargz.Decompressor {
	if f == Zstd {
		return new(zstdchunked.Decompressor)
	}
	return new(estargz.GzipDecompressor)
}

// Blob crafts a blob: compressed streams of payload, then any TOC JSON
// with the format's framing and footer.
type Blob struct {
	f   Format
	buf bytes.Buffer
}

// NewBlob starts a blob of format f.
func NewBlob(f Format) *Blob { return &Blob{f: f} }

// Offset is where the next stream starts.
func (b *Blob) Offset() int64 { return int64(b.buf.Len()) }

// Stream appends one compressed stream (a gzip member, a zstd frame) of
// data and returns its offset.
func (b *Blob) Stream(data []byte) int64 {
	off := b.Offset()
	if b.f == Zstd {
		zw, _ := zstd.NewWriter(&b.buf, zstd.WithEncoderConcurrency(1))
		zw.Write(data)
		zw.Close()
	} else {
		zw := gzip.NewWriter(&b.buf)
		zw.Write(data)
		zw.Close()
	}
	return off
}

// Raw appends bytes as they are.
func (b *Blob) Raw(p []byte) int64 {
	off := b.Offset()
	b.buf.Write(p)
	return off
}

// Finish appends tocJSON as the TOC, and the footer, and returns the blob
// and the digest of the TOC JSON (what the layer's annotation says).
func (b *Blob) Finish(tocJSON []byte) ([]byte, digest.Digest) {
	blob, err := b.FinishStream(int64(len(tocJSON)), func(w io.Writer) error {
		_, err := w.Write(tocJSON)
		return err
	})
	if err != nil {
		panic(err) // writes to memory do not fail
	}
	return blob, digest.FromBytes(tocJSON)
}

// FinishStream is Finish for a TOC of size bytes that write writes, so
// that huge TOCs are never held in memory uncompressed.
func (b *Blob) FinishStream(size int64, write func(io.Writer) error) ([]byte, error) {
	payload := b.Offset()
	if b.f == Zstd {
		var c bytes.Buffer
		zw, _ := zstd.NewWriter(&c, zstd.WithEncoderConcurrency(1))
		if err := write(zw); err != nil {
			return nil, err
		}
		if err := zw.Close(); err != nil {
			return nil, err
		}
		b.buf.Write(skippable(c.Bytes()))
		footer := make([]byte, zstdchunked.FooterSize)
		binary.LittleEndian.PutUint64(footer, uint64(payload+8))
		binary.LittleEndian.PutUint64(footer[8:], uint64(c.Len()))
		binary.LittleEndian.PutUint64(footer[16:], uint64(size))
		binary.LittleEndian.PutUint64(footer[24:], 1)
		copy(footer[32:], []byte{0x47, 0x6e, 0x55, 0x6c, 0x49, 0x6e, 0x55, 0x78})
		b.buf.Write(skippable(footer))
		return b.buf.Bytes(), nil
	}
	zw, _ := gzip.NewWriterLevel(&b.buf, gzip.BestSpeed)
	tw := tar.NewWriter(zw)
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: estargz.TOCTarName, Size: size}); err != nil {
		return nil, err
	}
	if err := write(tw); err != nil {
		return nil, err
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	if err := zw.Close(); err != nil {
		return nil, err
	}
	b.buf.Write(GzipFooter(payload))
	return b.buf.Bytes(), nil
}

// GzipFooter is eStargz's 51 byte footer naming the TOC at tocOff.
func GzipFooter(tocOff int64) []byte {
	sub := fmt.Sprintf("%016xSTARGZ", tocOff)
	extra := []byte{'S', 'G', 0, 0}
	binary.LittleEndian.PutUint16(extra[2:], uint16(len(sub)))
	return estargz.CreateGzipFooter(append(extra, sub...))
}

func skippable(p []byte) []byte {
	h := []byte{0x50, 0x2a, 0x4d, 0x18, 0, 0, 0, 0}
	binary.LittleEndian.PutUint32(h[4:], uint32(len(p)))
	return append(h, p...)
}

// TOCJSON marshals entries as estargz's writer does.
func TOCJSON(entries ...*estargz.TOCEntry) []byte {
	p, err := json.MarshalIndent(&estargz.JTOC{Version: 1, Entries: entries}, "", "\t")
	if err != nil {
		panic(err)
	}
	return p
}
