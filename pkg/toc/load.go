package toc

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	digest "github.com/opencontainers/go-digest"
)

// Load reads the footer and the TOC of a blob (two ReadAt calls), decompresses
// the TOC with a hard bound of lim.MaxTOCSize, and builds the index while it
// decodes, so that neither the JSON nor the decoded TOC is ever held whole.
// dec says the format: estargz's gzip decompressors or zstdchunked's.
func Load(blob io.ReaderAt, size int64, dec estargz.Decompressor, lim Limits) (*Index, error) {
	lim = lim.withDefaults()
	zstdTOC := false
	switch dec.(type) {
	case *estargz.GzipDecompressor, *estargz.LegacyGzipDecompressor:
	case *zstdchunked.Decompressor:
		zstdTOC = true
	default:
		return nil, fmt.Errorf("unsupported layer format %T", dec)
	}
	fsize := dec.FooterSize()
	if size < fsize {
		return nil, fmt.Errorf("%w: %d byte blob, smaller than a footer", ErrInvalid, size)
	}
	footer := make([]byte, fsize)
	if err := readAt(blob, footer, size-fsize); err != nil {
		return nil, fmt.Errorf("read footer: %w", err)
	}
	payload, tocOff, tocSize, err := parseFooter(dec, footer)
	if err != nil {
		return nil, fmt.Errorf("%w: footer: %v", ErrInvalid, err)
	}
	if tocSize <= 0 {
		tocSize = size - fsize - tocOff
	}
	// A compressed TOC larger than the limit on its JSON is not a TOC any
	// writer makes; refusing it bounds the read.
	maxCompressed := lim.MaxTOCSize + 1<<20
	if tocOff < 0 || tocOff > size-fsize || tocSize <= 0 || tocSize > size-fsize-tocOff || payload < 0 || payload > tocOff {
		return nil, fmt.Errorf("%w: footer names a TOC at %d+%d (payload %d) in a %d byte blob", ErrInvalid, tocOff, tocSize, payload, size)
	}
	if tocSize > maxCompressed {
		return nil, fmt.Errorf("%w: compressed TOC of %d bytes, more than the limit of %d", ErrInvalid, tocSize, maxCompressed)
	}
	buf := make([]byte, tocSize)
	if err := readAt(blob, buf, tocOff); err != nil {
		return nil, fmt.Errorf("read TOC: %w", err)
	}
	var src io.Reader
	if zstdTOC {
		zr, err := zstd.NewReader(bytes.NewReader(buf),
			zstd.WithDecoderConcurrency(1),
			zstd.WithDecoderLowmem(true),
			// Writers use windows of up to 8 MiB; a frame may not claim
			// more memory than that or the TOC's limit.
			zstd.WithDecoderMaxMemory(uint64(max(lim.MaxTOCSize, 8<<20))+1),
			zstd.WithDecoderMaxWindow(uint64(max(lim.MaxTOCSize, 8<<20))))
		if err != nil {
			return nil, fmt.Errorf("%w: TOC: %v", ErrInvalid, err)
		}
		defer zr.Close()
		src = zr
	} else {
		zr, err := gzip.NewReader(bytes.NewReader(buf))
		if err != nil {
			return nil, fmt.Errorf("%w: TOC: malformed gzip header: %v", ErrInvalid, err)
		}
		defer zr.Close()
		zr.Multistream(false)
		tr := tar.NewReader(zr)
		h, err := tr.Next()
		if err != nil {
			return nil, fmt.Errorf("%w: TOC: no tar header: %v", ErrInvalid, err)
		}
		if h.Name != estargz.TOCTarName {
			return nil, fmt.Errorf("%w: TOC: tar entry %q, want %q", ErrInvalid, h.Name, estargz.TOCTarName)
		}
		if h.Size > lim.MaxTOCSize {
			return nil, fmt.Errorf("%w: TOC of %d bytes, more than the limit of %d", ErrInvalid, h.Size, lim.MaxTOCSize)
		}
		src = tr
	}
	b, err := newBuilder(payload, size, lim)
	if err != nil {
		return nil, err
	}
	dgst, err := decodeTOC(src, lim.MaxTOCSize, b)
	if err != nil {
		return nil, err
	}
	ix, err := b.finish()
	if err != nil {
		return nil, err
	}
	ix.TOCDigest = dgst
	return ix, nil
}

func readAt(r io.ReaderAt, p []byte, off int64) error {
	n, err := r.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	return err
}

// parseFooter turns a panic of a decompressor's footer parser (estargz's
// gzip parser slices the extra field by its claimed length) into an error.
func parseFooter(dec estargz.Decompressor, p []byte) (payload, tocOff, tocSize int64, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("malformed footer: %v", r)
		}
	}()
	return dec.ParseFooter(p)
}

var errTooBig = errors.New("TOC too big")

// limitReader fails, rather than ending early, past its limit.
type limitReader struct {
	r io.Reader
	n int64
}

func (l *limitReader) Read(p []byte) (int, error) {
	if l.n < 0 {
		return 0, errTooBig
	}
	if int64(len(p)) > l.n+1 {
		p = p[:l.n+1]
	}
	n, err := l.r.Read(p)
	l.n -= int64(n)
	if l.n < 0 {
		return n, errTooBig
	}
	return n, err
}

// decodeTOC streams TOC JSON into b and returns the digest of every byte
// of it. The digest is over the whole decompressed JSON, as estargz's
// writer computes the annotation.
func decodeTOC(r io.Reader, limit int64, b *builder) (digest.Digest, error) {
	dg := digest.Canonical.Digester()
	dec := json.NewDecoder(io.TeeReader(&limitReader{r: r, n: limit}, dg.Hash()))
	fail := func(err error) (digest.Digest, error) {
		if errors.Is(err, errTooBig) {
			return "", fmt.Errorf("%w: TOC JSON larger than the limit of %d bytes", ErrInvalid, limit)
		}
		if errors.Is(err, zstd.ErrWindowSizeExceeded) || errors.Is(err, zstd.ErrDecoderSizeExceeded) {
			return "", fmt.Errorf("%w: TOC needs more memory to decompress than the limit of %d bytes: %v", ErrInvalid, limit, err)
		}
		var ee *EntryError
		if errors.As(err, &ee) || errors.Is(err, ErrInvalid) {
			return "", err
		}
		return "", fmt.Errorf("%w: TOC JSON: %v", ErrInvalid, err)
	}
	tok, err := dec.Token()
	if err != nil {
		return fail(err)
	}
	if tok != json.Delim('{') {
		return fail(fmt.Errorf("not an object"))
	}
	seen := false
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return fail(err)
		}
		key, _ := tok.(string)
		// encoding/json matches field names without regard to case, and
		// so does estargz's decoder.
		if !strings.EqualFold(key, "entries") {
			var skip json.RawMessage
			if err := dec.Decode(&skip); err != nil {
				return fail(err)
			}
			continue
		}
		if seen {
			return fail(fmt.Errorf("two lists of entries"))
		}
		seen = true
		if tok, err = dec.Token(); err != nil {
			return fail(err)
		}
		if tok == nil {
			continue // null: no entries
		}
		if tok != json.Delim('[') {
			return fail(fmt.Errorf("entries are not a list"))
		}
		for dec.More() {
			if b.idx >= b.lim.MaxEntries {
				return fail(fmt.Errorf("%w: more than the limit of %d entries", ErrInvalid, b.lim.MaxEntries))
			}
			var te *estargz.TOCEntry
			if err := dec.Decode(&te); err != nil {
				if errors.Is(err, errTooBig) {
					return fail(err)
				}
				return fail(&EntryError{Index: b.idx, Err: invalid("%v", err)})
			}
			if err := b.add(te); err != nil {
				return fail(err)
			}
		}
		if _, err := dec.Token(); err != nil {
			return fail(err)
		}
	}
	if _, err := dec.Token(); err != nil { // the closing brace
		return fail(err)
	}
	if _, err := dec.Token(); err != io.EOF {
		if err == nil {
			err = fmt.Errorf("data after the TOC")
		}
		return fail(err)
	}
	return dg.Digest(), nil
}
