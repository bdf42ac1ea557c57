// Package convert turns OCI and Docker images into eStargz (or zstd:chunked)
// images that lazy-pulling snapshotters can mount, with the reference
// estargz module doing the format.
package convert

import (
	"archive/tar"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"io"
	"log/slog"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"unicode/utf8"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/partial"
	"github.com/google/go-containerregistry/pkg/v1/types"
	kgzip "github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"golang.org/x/sync/errgroup"

	"github.com/starling-dev/starling/pkg/progress"
)

// Annotations that mark a layer as lazily mountable, as stargz-snapshotter
// and every eStargz-aware tool read them.
const (
	TOCDigestAnnotation        = "containerd.io/snapshot/stargz/toc.digest"
	UncompressedSizeAnnotation = "io.containers.estargz.uncompressed-size"
)

// buildParallelism fixes how estargz slices a layer for parallel
// compression. The slicing decides chunk boundaries, so it must not follow
// the machine's core count: the same input must give the same digests
// everywhere.
const buildParallelism = 4

// ErrUnsupported is returned for a layer that cannot be converted.
var ErrUnsupported = errors.New("unsupported layer media type")

// Options configures a conversion.
type Options struct {
	// ChunkSize is the largest uncompressed chunk of a file (0: estargz's default, 4 MiB).
	ChunkSize int
	// MinChunkSize packs small files together into one gzip stream (0: off).
	MinChunkSize int
	// CompressionLevel is the gzip (1-9) or zstd level (0: 9 for gzip, 3 for zstd).
	CompressionLevel int
	// PrioritizedFiles are put first, before the prefetch landmark, in order.
	PrioritizedFiles []string
	// ZstdChunked writes zstd:chunked layers instead of gzip eStargz.
	ZstdChunked bool
	// Jobs is how many layers convert at once (0: GOMAXPROCS).
	Jobs int
	// WorkDir holds temporary files (""; the system's).
	WorkDir string
	// Progress shows per-layer progress (nil: none).
	Progress *progress.Progress
	// Logger receives warnings about layers left as they were (nil: slog.Default()).
	Logger *slog.Logger
}

// LayerResult describes one converted layer.
type LayerResult struct {
	Index            int     `json:"index"`
	Source           v1.Hash `json:"source"`
	SourceMediaType  string  `json:"source_media_type"`
	Digest           v1.Hash `json:"digest"`
	MediaType        string  `json:"media_type"`
	Size             int64   `json:"size"`
	UncompressedSize int64   `json:"uncompressed_size"`
	TOCDigest        string  `json:"toc_digest"`
	Kept             bool    `json:"kept"` // already eStargz, reused as it was
	// NotLazy says why the layer was left in its original format: it will
	// be downloaded and unpacked, never mounted lazily. Empty when converted.
	NotLazy string `json:"not_lazy,omitempty"`
}

// ImageResult describes one converted image.
type ImageResult struct {
	Platform string        `json:"platform,omitempty"`
	Digest   v1.Hash       `json:"digest"`
	Layers   []LayerResult `json:"layers"`
}

// LayerError names the layer a conversion failed on.
type LayerError struct {
	Image string
	Index int
	Count int
	Layer v1.Hash
	Err   error
}

func (e *LayerError) Error() string {
	return fmt.Sprintf("%s layer %d/%d %s: %v", e.Image, e.Index+1, e.Count, e.Layer, e.Err)
}

func (e *LayerError) Unwrap() error { return e.Err }

// Converter converts images; its temporary files live until Close.
type Converter struct {
	opts  Options
	mu    sync.Mutex
	files []string
}

// New returns a Converter.
func New(opts Options) *Converter {
	if opts.Jobs <= 0 {
		opts.Jobs = runtime.GOMAXPROCS(0)
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	return &Converter{opts: opts}
}

// Close removes the temporary files that back converted layers. Call it after
// the result has been written.
func (c *Converter) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	var errs []error
	for _, f := range c.files {
		if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	c.files = nil
	return errors.Join(errs...)
}

func (c *Converter) tempFile(pattern string) (*os.File, error) {
	f, err := os.CreateTemp(c.opts.WorkDir, pattern)
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	c.files = append(c.files, f.Name())
	c.mu.Unlock()
	return f, nil
}

// Image converts every layer of img; name is used in errors and progress.
func (c *Converter) Image(ctx context.Context, name string, img v1.Image) (v1.Image, *ImageResult, error) {
	m, err := img.Manifest()
	if err != nil {
		return nil, nil, fmt.Errorf("%s: read manifest: %w", name, err)
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		return nil, nil, fmt.Errorf("%s: read config: %w", name, err)
	}
	layers, err := img.Layers()
	if err != nil {
		return nil, nil, fmt.Errorf("%s: list layers: %w", name, err)
	}
	if len(layers) != len(m.Layers) {
		return nil, nil, fmt.Errorf("%s: manifest lists %d layers, image has %d", name, len(m.Layers), len(layers))
	}
	res := &ImageResult{Layers: make([]LayerResult, len(layers))}
	out := make([]v1.Layer, len(layers))
	annos := make([]map[string]string, len(layers))

	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(c.opts.Jobs)
	for i := range layers {
		g.Go(func() error {
			l, r, a, err := c.layer(gctx, name, i, len(layers), layers[i], m.Layers[i])
			if err != nil {
				return &LayerError{Image: name, Index: i, Count: len(layers), Layer: m.Layers[i].Digest, Err: err}
			}
			out[i], res.Layers[i], annos[i] = l, r, a
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return nil, nil, err
	}

	// Rebuild the image around the new layers: same manifest and config
	// media types, same config but for the diff IDs, same annotations.
	mt, cmt := m.MediaType, m.Config.MediaType
	if mt == "" {
		// OCI lets a manifest leave its media type out; registries and
		// containerd want it spelled.
		mt = types.OCIManifestSchema1
	}
	if cmt == "" {
		cmt = types.OCIConfigJSON
	}
	base := mutate.MediaType(empty.Image, mt)
	base = mutate.ConfigMediaType(base, cmt)
	if mt == types.DockerManifestSchema2 && c.opts.ZstdChunked {
		// A Docker manifest cannot carry zstd layers.
		base = mutate.MediaType(base, types.OCIManifestSchema1)
		base = mutate.ConfigMediaType(base, types.OCIConfigJSON)
	}
	adds := make([]mutate.Addendum, len(out))
	for i := range out {
		mt, _ := out[i].MediaType()
		adds[i] = mutate.Addendum{Layer: out[i], Annotations: annos[i], MediaType: mt}
	}
	newImg, err := mutate.Append(base, adds...)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: assemble image: %w", name, err)
	}
	newCfg := cfg.DeepCopy()
	newCfg.RootFS.DiffIDs = make([]v1.Hash, len(out))
	for i, l := range out {
		if newCfg.RootFS.DiffIDs[i], err = l.DiffID(); err != nil {
			return nil, nil, fmt.Errorf("%s: layer %d diff ID: %w", name, i+1, err)
		}
	}
	if newImg, err = mutate.ConfigFile(newImg, newCfg); err != nil {
		return nil, nil, fmt.Errorf("%s: write config: %w", name, err)
	}
	if len(m.Annotations) > 0 {
		newImg = mutate.Annotations(newImg, m.Annotations).(v1.Image)
	}
	if res.Digest, err = newImg.Digest(); err != nil {
		return nil, nil, fmt.Errorf("%s: manifest digest: %w", name, err)
	}
	return newImg, res, nil
}

// copyVerified copies a layer's compressed bytes to a temporary file and
// checks them against the digest the manifest names.
func (c *Converter) copyVerified(desc v1.Descriptor, l v1.Layer, task *progress.Task) (*os.File, error) {
	rc, err := l.Compressed()
	if err != nil {
		return nil, fmt.Errorf("fetch: %w", err)
	}
	defer rc.Close()
	f, err := c.tempFile("starling-src-*")
	if err != nil {
		return nil, err
	}
	h := sha256.New()
	var r io.Reader = io.TeeReader(rc, h)
	if task != nil {
		r = task.ProxyReader(r)
	}
	n, err := io.Copy(f, r)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("fetch: %w", err)
	}
	got := v1.Hash{Algorithm: "sha256", Hex: fmt.Sprintf("%x", h.Sum(nil))}
	if got != desc.Digest {
		f.Close()
		return nil, fmt.Errorf("content has digest %s, the manifest says %s", got, desc.Digest)
	}
	if desc.Size > 0 && n != desc.Size {
		f.Close()
		return nil, fmt.Errorf("content is %d bytes, the manifest says %d", n, desc.Size)
	}
	return f, nil
}

func supported(mt types.MediaType) bool {
	switch mt {
	case types.OCILayer, types.DockerLayer, types.OCIUncompressedLayer, types.DockerUncompressedLayer,
		types.OCILayerZStd, "application/vnd.oci.image.layer.v1.tar+gzip+estargz":
		return true
	}
	return false
}

func (c *Converter) layer(ctx context.Context, name string, i, n int, l v1.Layer, desc v1.Descriptor) (v1.Layer, LayerResult, map[string]string, error) {
	res := LayerResult{Index: i, Source: desc.Digest, SourceMediaType: string(desc.MediaType)}
	if !supported(desc.MediaType) {
		return nil, res, nil, fmt.Errorf("%w %q", ErrUnsupported, desc.MediaType)
	}
	var task *progress.Task
	if c.opts.Progress != nil {
		task = c.opts.Progress.Task(desc.Digest.String(), fmt.Sprintf("layer %d/%d %.19s", i+1, n, desc.Digest.String()), desc.Size)
	}
	out, res, annos, err := c.layerInner(ctx, l, desc, res, task)
	if task != nil {
		task.Done(err)
	}
	if err == nil && res.NotLazy != "" {
		c.opts.Logger.Warn("layer left as it was, it will not mount lazily", "image", name,
			"layer", fmt.Sprintf("%d/%d %s", i+1, n, desc.Digest), "reason", res.NotLazy)
	}
	return out, res, annos, err
}

func (c *Converter) layerInner(ctx context.Context, l v1.Layer, desc v1.Descriptor, res LayerResult, task *progress.Task) (v1.Layer, LayerResult, map[string]string, error) {
	src, err := c.copyVerified(desc, l, task)
	if err != nil {
		return nil, res, nil, err
	}
	defer src.Close()
	st, err := src.Stat()
	if err != nil {
		return nil, res, nil, err
	}
	sr := io.NewSectionReader(src, 0, st.Size())

	// A name the TOC cannot hold would show differently in a lazy mount
	// than in an unpacked layer; such a layer stays as it is, and one that
	// is eStargz already loses its TOC annotation.
	bad, err := unrepresentable(sr)
	if err != nil {
		return nil, res, nil, err
	}
	if bad != "" {
		return c.keepOriginal(desc, src.Name(), sr, res, bad)
	}
	if kept, r, annos, ok := c.keepIfLazy(desc, src.Name(), sr, res); ok {
		return kept, r, annos, nil
	}

	var opts []estargz.Option
	opts = append(opts, estargz.WithContext(ctx), estargz.WithParallelism(buildParallelism), estargz.WithGzipHelperFunc(fastGunzip))
	if c.opts.ChunkSize > 0 {
		opts = append(opts, estargz.WithChunkSize(c.opts.ChunkSize))
	}
	if c.opts.MinChunkSize > 0 {
		opts = append(opts, estargz.WithMinChunkSize(c.opts.MinChunkSize))
	}
	if len(c.opts.PrioritizedFiles) > 0 {
		var missed []string
		opts = append(opts, estargz.WithPrioritizedFiles(c.opts.PrioritizedFiles), estargz.WithAllowPrioritizeNotFound(&missed))
	}
	mediaType := types.OCILayer
	if desc.MediaType == types.DockerLayer || desc.MediaType == types.DockerUncompressedLayer {
		mediaType = types.DockerLayer
	}
	var zc *zstdchunked.Compressor
	if c.opts.ZstdChunked {
		lvl := zstd.SpeedDefault
		if c.opts.CompressionLevel > 0 {
			lvl = zstd.EncoderLevelFromZstd(c.opts.CompressionLevel)
		}
		zc = &zstdchunked.Compressor{CompressionLevel: lvl, Metadata: map[string]string{}}
		opts = append(opts, estargz.WithCompression(zstdCompression{zc, new(zstdchunked.Decompressor)}))
		mediaType = types.OCILayerZStd
	} else {
		lvl := c.opts.CompressionLevel
		if lvl == 0 {
			lvl = kgzip.BestCompression
		}
		opts = append(opts, estargz.WithCompression(newFastGzip(lvl)))
	}
	blob, err := estargz.Build(sr, opts...)
	if err != nil {
		return nil, res, nil, fmt.Errorf("build eStargz: %w", err)
	}
	defer blob.Close()
	dst, err := c.tempFile("starling-esgz-*")
	if err != nil {
		return nil, res, nil, err
	}
	defer dst.Close()
	h := sha256.New()
	size, err := io.Copy(io.MultiWriter(dst, h), blob)
	if err != nil {
		return nil, res, nil, fmt.Errorf("build eStargz: %w", err)
	}
	usize, err := blob.UncompressedSize()
	if err != nil {
		return nil, res, nil, fmt.Errorf("build eStargz: %w", err)
	}
	diffID, err := v1.NewHash(blob.DiffID().String())
	if err != nil {
		return nil, res, nil, err
	}
	res.Digest = hashOf(h)
	res.MediaType = string(mediaType)
	res.Size = size
	res.UncompressedSize = usize
	res.TOCDigest = blob.TOCDigest().String()
	annos := map[string]string{
		TOCDigestAnnotation:        res.TOCDigest,
		UncompressedSizeAnnotation: strconv.FormatInt(usize, 10),
	}
	if zc != nil {
		for k, v := range zc.Metadata {
			annos[k] = v
		}
	}
	out, err := fileLayer(dst.Name(), res.Digest, diffID, size, mediaType)
	if err != nil {
		return nil, res, nil, err
	}
	return out, res, annos, nil
}

// keepIfLazy reuses a layer that is eStargz already, adding the annotations
// if the source manifest lacked them.
func (c *Converter) keepIfLazy(desc v1.Descriptor, path string, sr *io.SectionReader, res LayerResult) (v1.Layer, LayerResult, map[string]string, bool) {
	var ropts []estargz.OpenOption
	if desc.MediaType == types.OCILayerZStd {
		ropts = append(ropts, estargz.WithDecompressors(new(zstdchunked.Decompressor)))
	}
	r, err := estargz.Open(sr, ropts...)
	if err != nil {
		return nil, res, nil, false
	}
	if want := desc.Annotations[TOCDigestAnnotation]; want != "" && want != r.TOCDigest().String() {
		// The annotation lies about the TOC: rebuild rather than keep it.
		return nil, res, nil, false
	}
	usize, diffID, err := uncompressedInfo(sr, desc.MediaType)
	if err != nil {
		return nil, res, nil, false
	}
	annos := map[string]string{}
	for k, v := range desc.Annotations {
		annos[k] = v
	}
	annos[TOCDigestAnnotation] = r.TOCDigest().String()
	annos[UncompressedSizeAnnotation] = strconv.FormatInt(usize, 10)
	res.Digest = desc.Digest
	res.MediaType = string(desc.MediaType)
	res.Size = sr.Size()
	res.UncompressedSize = usize
	res.TOCDigest = r.TOCDigest().String()
	res.Kept = true
	l, err := fileLayer(path, desc.Digest, diffID, sr.Size(), desc.MediaType)
	if err != nil {
		return nil, res, nil, false
	}
	return l, res, annos, true
}

// keepOriginal returns the layer as it came, to be downloaded and unpacked
// as an ordinary layer, with why in res.NotLazy.
func (c *Converter) keepOriginal(desc v1.Descriptor, path string, sr *io.SectionReader, res LayerResult, why string) (v1.Layer, LayerResult, map[string]string, error) {
	usize, diffID, err := uncompressedInfo(sr, desc.MediaType)
	if err != nil {
		return nil, res, nil, fmt.Errorf("read layer: %w", err)
	}
	l, err := fileLayer(path, desc.Digest, diffID, sr.Size(), desc.MediaType)
	if err != nil {
		return nil, res, nil, err
	}
	res.Digest = desc.Digest
	res.MediaType = string(desc.MediaType)
	res.Size = sr.Size()
	res.UncompressedSize = usize
	res.NotLazy = why
	annos := map[string]string{}
	for k, v := range desc.Annotations {
		switch k {
		case TOCDigestAnnotation, UncompressedSizeAnnotation,
			zstdchunked.ManifestChecksumAnnotation, zstdchunked.ManifestPositionAnnotation:
			// What would make a snapshotter mount it lazily.
		default:
			annos[k] = v
		}
	}
	return l, res, annos, nil
}

// unrepresentable says which entry of a layer a TOC cannot represent
// exactly, or "" when it can hold them all. A TOC is JSON: encoding/json
// writes every byte that is not UTF-8 as U+FFFD, so a name, link target or
// xattr name that is not valid UTF-8 would come back as another name.
func unrepresentable(sr *io.SectionReader) (string, error) {
	r, closer, err := decompressed(io.NewSectionReader(sr, 0, sr.Size()))
	if err != nil {
		return "", fmt.Errorf("read layer: %w", err)
	}
	defer closer()
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return "", nil
		}
		if err != nil {
			return "", fmt.Errorf("read layer: %w", err)
		}
		switch {
		case !utf8.ValidString(h.Name):
			return fmt.Sprintf("entry %q: name is not UTF-8, which a TOC cannot hold", h.Name), nil
		case !utf8.ValidString(h.Linkname):
			return fmt.Sprintf("entry %q: link target %q is not UTF-8, which a TOC cannot hold", h.Name, h.Linkname), nil
		}
		for k := range h.PAXRecords {
			if strings.HasPrefix(k, "SCHILY.xattr.") && !utf8.ValidString(k) {
				return fmt.Sprintf("entry %q: xattr name %q is not UTF-8, which a TOC cannot hold", h.Name, strings.TrimPrefix(k, "SCHILY.xattr.")), nil
			}
		}
	}
}

// decompressed reads a layer blob as tar, whatever its compression (gzip,
// zstd or none), told by its first bytes as estargz.Build tells it.
func decompressed(sr *io.SectionReader) (io.Reader, func(), error) {
	var magic [4]byte
	n, _ := sr.ReadAt(magic[:], 0)
	switch {
	case n >= 2 && magic[0] == 0x1f && magic[1] == 0x8b:
		gr, err := kgzip.NewReader(sr)
		if err != nil {
			return nil, nil, err
		}
		return gr, func() { gr.Close() }, nil
	case n == 4 && magic == [4]byte{0x28, 0xb5, 0x2f, 0xfd}:
		zr, err := zstd.NewReader(sr)
		if err != nil {
			return nil, nil, err
		}
		return zr, zr.Close, nil
	}
	return sr, func() {}, nil
}

func uncompressedInfo(sr *io.SectionReader, mt types.MediaType) (int64, v1.Hash, error) {
	var r io.Reader
	switch mt {
	case types.OCIUncompressedLayer, types.DockerUncompressedLayer:
		r = io.NewSectionReader(sr, 0, sr.Size())
	case types.OCILayerZStd:
		zr, err := zstd.NewReader(io.NewSectionReader(sr, 0, sr.Size()))
		if err != nil {
			return 0, v1.Hash{}, err
		}
		defer zr.Close()
		r = zr
	default:
		gr, err := kgzip.NewReader(io.NewSectionReader(sr, 0, sr.Size()))
		if err != nil {
			return 0, v1.Hash{}, err
		}
		defer gr.Close()
		r = gr
	}
	h := sha256.New()
	n, err := io.Copy(h, r)
	if err != nil {
		return 0, v1.Hash{}, err
	}
	return n, hashOf(h), nil
}

func hashOf(h hash.Hash) v1.Hash {
	return v1.Hash{Algorithm: "sha256", Hex: fmt.Sprintf("%x", h.Sum(nil))}
}

// fileBlob is a compressed layer held in a file, with everything about it
// already known, so nothing is recomputed when it is pushed.
type fileBlob struct {
	path   string
	digest v1.Hash
	diffID v1.Hash
	size   int64
	mt     types.MediaType
}

func (f *fileBlob) Digest() (v1.Hash, error)            { return f.digest, nil }
func (f *fileBlob) DiffID() (v1.Hash, error)            { return f.diffID, nil }
func (f *fileBlob) Size() (int64, error)                { return f.size, nil }
func (f *fileBlob) MediaType() (types.MediaType, error) { return f.mt, nil }
func (f *fileBlob) Compressed() (io.ReadCloser, error)  { return os.Open(f.path) }

func fileLayer(path string, digest, diffID v1.Hash, size int64, mt types.MediaType) (v1.Layer, error) {
	if path == "" {
		return nil, errors.New("layer has no backing file")
	}
	return partial.CompressedToLayer(&fileBlob{path: path, digest: digest, diffID: diffID, size: size, mt: mt})
}

// zstdCompression pairs zstd:chunked's compressor and decompressor, as
// estargz.Build wants both.
type zstdCompression struct {
	*zstdchunked.Compressor
	*zstdchunked.Decompressor
}
