// Package layer resolves lazily mountable layers — reads, checks and
// indexes their TOC — and shows them through the node's lazy filesystem,
// with prefetch of the prioritized region and background fetch of the rest.
//
// A Layer owns its chunk reader, its fetcher and its background work; Close
// (or Unmount, which closes) ends all of them, on every path that ends a
// layer: snapshot removed, prepare failed, daemon shutdown.
package layer

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime/debug"
	"sort"
	"sync"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"github.com/starling-dev/starling/pkg/blob"
	"github.com/starling-dev/starling/pkg/chunkcache"
	"github.com/starling-dev/starling/pkg/config"
	"github.com/starling-dev/starling/pkg/lazyfs"
	"github.com/starling-dev/starling/pkg/toc"
)

// Annotations of a lazily mountable layer descriptor.
const (
	TOCDigestAnnotation        = "containerd.io/snapshot/stargz/toc.digest"
	UncompressedSizeAnnotation = "io.containers.estargz.uncompressed-size"
)

// ErrNotLazy is returned for a layer that cannot be mounted lazily; it goes
// the ordinary way (downloaded and unpacked).
var ErrNotLazy = errors.New("layer is not lazily mountable")

// FetcherFactory makes the Fetcher of a layer's blob; the P2P peer plugs in
// here. A Fetcher that is also an io.Closer is closed with its layer.
type FetcherFactory func(repo name.Repository, desc v1.Descriptor) blob.Fetcher

// Registry is what the Manager needs of a registry client.
type Registry interface {
	blob.RangeReader
	BlobSize(ctx context.Context, repo name.Repository, h v1.Hash) (int64, error)
}

// Options configures a Manager.
type Options struct {
	Root     string // state directory: chunks in Root/chunks, the FUSE mount at Root/mnt
	Registry Registry
	FS       config.FS
	Fetcher  FetcherFactory // nil: ranged reads from the registry
	// Store overrides the chunk store (tests); nil opens Root/chunks.
	Store  blob.Store
	Logger *slog.Logger
	// Registerer, when set, gets the Manager's metrics:
	// starling_layer_bytes_total{source} and
	// starling_layer_wait_seconds_total{source}, over every layer.
	Registerer prometheus.Registerer
}

// Manager resolves and mounts layers; it owns the node's chunk store and
// the lazy filesystem.
type Manager struct {
	o     Options
	store blob.Store

	mu     sync.Mutex
	fs     *lazyfs.FS
	layers map[*Layer]bool // resolved and not closed
	// retired sums the sources of closed layers, so that the metrics
	// over all layers never go back when one closes.
	retired map[string]blob.SourceCount
}

// NewManager opens the chunk store. The lazy filesystem is mounted with
// the first layer.
func NewManager(o Options) (*Manager, error) {
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	d := config.DefaultFS()
	if o.FS.TailFetchSize <= 0 {
		o.FS.TailFetchSize = d.TailFetchSize
	}
	if o.FS.FetchTimeout <= 0 {
		o.FS.FetchTimeout = d.FetchTimeout
	}
	m := &Manager{o: o, store: o.Store, layers: map[*Layer]bool{}, retired: map[string]blob.SourceCount{}}
	if o.Registerer != nil {
		if err := o.Registerer.Register(sourceCollector{m}); err != nil {
			return nil, fmt.Errorf("layer metrics: %w", err)
		}
	}
	if m.store == nil {
		c, err := chunkcache.Open(filepath.Join(o.Root, "chunks"), o.FS.CacheSize)
		if err != nil {
			return nil, err
		}
		m.store = c
	}
	return m, nil
}

// Store is the node's chunk store.
func (m *Manager) Store() blob.Store { return m.store }

// FileSystem mounts (once) and returns the lazy filesystem.
func (m *Manager) FileSystem() (*lazyfs.FS, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.fs != nil {
		return m.fs, nil
	}
	f, err := lazyfs.Mount(filepath.Join(m.o.Root, "mnt"), lazyfs.Options{Passthrough: m.o.FS.Passthrough, Logger: m.o.Logger})
	if err != nil {
		return nil, err
	}
	m.fs = f
	return f, nil
}

// Close closes every layer still open and unmounts the lazy filesystem.
func (m *Manager) Close() error {
	m.mu.Lock()
	ls := make([]*Layer, 0, len(m.layers))
	for l := range m.layers {
		ls = append(ls, l)
	}
	m.mu.Unlock()
	var errs []error
	for _, l := range ls {
		if err := l.Unmount(); err != nil {
			errs = append(errs, err)
		}
	}
	m.mu.Lock()
	f := m.fs
	m.fs = nil
	m.mu.Unlock()
	if f != nil {
		errs = append(errs, f.Unmount())
	}
	if c, ok := m.store.(io.Closer); ok && m.o.Store == nil {
		errs = append(errs, c.Close())
	}
	return errors.Join(errs...)
}

// Open is the number of layers resolved and not closed yet.
func (m *Manager) Open() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.layers)
}

// IsLazy reports whether desc carries what a lazy mount needs.
func IsLazy(desc v1.Descriptor) bool {
	_, ok := desc.Annotations[TOCDigestAnnotation]
	return ok
}

// Layer is a resolved layer, ready to mount.
type Layer struct {
	desc    v1.Descriptor
	index   *toc.Index
	chunks  *blob.Reader
	fetcher blob.Fetcher
	m       *Manager

	ctx    context.Context // ends with the layer: background work runs under it
	cancel context.CancelFunc
	done   chan struct{}

	mu     sync.Mutex
	id     string // directory in the lazy filesystem
	dir    string // where it is bind-mounted
	closed bool
}

// Decompressor returns the decompressor of a lazily mountable media type.
func Decompressor(mediaType types.MediaType) (estargz.Decompressor, bool) {
	switch mediaType {
	case types.OCILayer, types.DockerLayer, "application/vnd.oci.image.layer.v1.tar+gzip+estargz":
		return new(estargz.GzipDecompressor), true
	case types.OCILayerZStd:
		return new(zstdchunked.Decompressor), true
	}
	return nil, false
}

// Limits are the TOC bounds of the fs configuration.
func Limits(fs config.FS) toc.Limits {
	return toc.Limits{MaxTOCSize: fs.MaxTOCSize, MaxEntries: fs.MaxTOCEntries, MaxChunkSize: fs.MaxChunkSize}
}

// Resolve reads the layer's footer and TOC (usually in one request), checks
// the TOC against the descriptor's annotation, validates every entry, and
// starts fetching the prioritized region. A layer that fails any check is
// refused whole, with an error that names it and the entry.
func (m *Manager) Resolve(ctx context.Context, repo name.Repository, desc v1.Descriptor) (*Layer, error) {
	want, ok := desc.Annotations[TOCDigestAnnotation]
	if !ok {
		return nil, fmt.Errorf("layer %s: %w: no %s annotation", desc.Digest, ErrNotLazy, TOCDigestAnnotation)
	}
	tocDigest, err := digest.Parse(want)
	if err != nil {
		return nil, fmt.Errorf("layer %s: bad TOC digest annotation %q: %w", desc.Digest, want, err)
	}
	dec, ok := Decompressor(desc.MediaType)
	if !ok {
		return nil, fmt.Errorf("layer %s: %w: media type %q", desc.Digest, ErrNotLazy, desc.MediaType)
	}
	var f blob.Fetcher
	if m.o.Fetcher != nil {
		f = m.o.Fetcher(repo, desc)
	} else {
		f = &blob.RegistryFetcher{Client: m.o.Registry, Repo: repo, Digest: desc.Digest}
	}
	counted := blob.Counted(f)
	// The reader exists before the TOC is read, so that the footer and
	// TOC count among the layer's bytes by source.
	br := blob.NewReader(counted, m.store, blob.Options{
		Layer:        desc.Digest.String(),
		Decompressor: dec,
		FetchTimeout: m.o.FS.FetchTimeout,
		MaxMerge:     64 << 20,
		Logger:       m.o.Logger,
	})
	ok = false
	defer func() {
		if !ok {
			br.Close()
			closeFetcher(f)
			m.retire(br.Stats().Sources)
		}
	}()
	size := desc.Size
	if size <= 0 {
		if size, err = m.o.Registry.BlobSize(ctx, repo, desc.Digest); err != nil {
			return nil, fmt.Errorf("layer %s: %w", desc.Digest, err)
		}
	}
	load := func(fetch fetchFunc) (*toc.Index, error) {
		ra := &tailReaderAt{ctx: ctx, f: fetch, size: size, tail: min(size, m.o.FS.TailFetchSize), timeout: m.o.FS.FetchTimeout}
		ix, err := toc.Load(ra, size, dec, Limits(m.o.FS))
		if err == nil && ix.TOCDigest != tocDigest {
			err = fmt.Errorf("TOC does not match the annotation: its digest is %s, the annotation says %s", ix.TOCDigest, tocDigest)
		}
		return ix, err
	}
	m.o.Logger.Debug("resolving layer", "layer", desc.Digest, "size", size)
	ix, err := load(fetchFunc(br.FetchRange))
	if err == nil {
		// The tail read at resolve (footer, TOC, and the end of the last
		// chunks' streams) is what every other node's resolve reads too:
		// with the TOC matching its digest, the P2P peer may offer it.
		// Whoever uses the chunk bytes in it verifies them as chunks.
		tail := min(size, m.o.FS.TailFetchSize)
		blob.Confirm(counted, size-tail, tail)
		if ix.TOCOffset < size-tail {
			// A TOC longer than the tail was read apart.
			blob.Confirm(counted, ix.TOCOffset, size-tail-ix.TOCOffset)
		}
	}
	if err != nil && !errors.Is(err, toc.ErrLossy) && ctx.Err() == nil {
		// Through the P2P peer the footer and TOC may come from another
		// node, corrupted on the way or by it: the registry decides.
		if d, ok := counted.(blob.DirectFetcher); ok {
			m.o.Logger.Warn("layer footer or TOC through the peer is bad: reading it from the registry", "layer", desc.Digest, "err", err)
			ix, err = load(fetchFunc(d.FetchDirect))
		}
	}
	if errors.Is(err, toc.ErrLossy) {
		// Names the TOC cannot carry exactly (not UTF-8): only the layer's
		// own tar has them right, so it is pulled whole.
		return nil, fmt.Errorf("layer %s: %w: %w", desc.Digest, ErrNotLazy, err)
	}
	if err != nil {
		return nil, fmt.Errorf("layer %s: %w", desc.Digest, err)
	}
	m.o.Logger.Debug("layer resolved", "layer", desc.Digest, "entries", ix.Entries)
	lctx, cancel := context.WithCancel(context.Background())
	l := &Layer{desc: desc, index: ix, chunks: br, fetcher: f, m: m, ctx: lctx, cancel: cancel, done: make(chan struct{})}
	m.mu.Lock()
	m.layers[l] = true
	m.mu.Unlock()
	ok = true
	// The prioritized region is on its way while containerd is still
	// pulling the other layers and creating the container.
	go l.fetchAhead()
	return l, nil
}

func closeFetcher(f blob.Fetcher) {
	if c, ok := f.(io.Closer); ok {
		_ = c.Close()
	}
}

// Index is the layer's validated TOC.
func (l *Layer) Index() *toc.Index { return l.index }

// Descriptor is the layer's descriptor.
func (l *Layer) Descriptor() v1.Descriptor { return l.desc }

// Stats says what reading the layer has cost so far.
func (l *Layer) Stats() blob.Stats { return l.chunks.Stats() }

// Mount shows the layer at mountpoint: its directory in the lazy
// filesystem, bind-mounted there.
func (l *Layer) Mount(mountpoint string) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return fmt.Errorf("layer %s: %w", l.desc.Digest, blob.ErrClosed)
	}
	if l.dir != "" {
		return fmt.Errorf("layer %s: already mounted at %s", l.desc.Digest, l.dir)
	}
	f, err := l.m.FileSystem()
	if err != nil {
		return fmt.Errorf("layer %s: %w", l.desc.Digest, err)
	}
	sum := sha256.Sum256([]byte(mountpoint))
	id := hex.EncodeToString(sum[:12])
	src, err := f.Add(id, &lazyfs.Layer{Index: l.index, Chunks: l.chunks, Name: l.desc.Digest.String(), Logger: l.m.o.Logger})
	if err != nil {
		return err
	}
	if err := os.MkdirAll(mountpoint, 0o755); err != nil {
		f.Remove(id)
		return fmt.Errorf("layer %s: %w", l.desc.Digest, err)
	}
	if err := unix.Mount(src, mountpoint, "", unix.MS_BIND, ""); err != nil {
		f.Remove(id)
		return fmt.Errorf("layer %s: bind %s at %s: %w", l.desc.Digest, src, mountpoint, err)
	}
	l.id, l.dir = id, mountpoint
	return nil
}

// Unmount takes the layer off its mountpoint (detaching it if containers
// still use it, so that the daemon can stop) and closes it.
func (l *Layer) Unmount() error {
	l.mu.Lock()
	id, dir := l.id, l.dir
	l.id, l.dir = "", ""
	l.mu.Unlock()
	var err error
	if dir != "" {
		if err = unix.Unmount(dir, 0); err != nil {
			if derr := unix.Unmount(dir, unix.MNT_DETACH); derr == nil || errors.Is(derr, unix.EINVAL) {
				err = nil
			}
		}
		l.m.mu.Lock()
		f := l.m.fs
		l.m.mu.Unlock()
		if f != nil {
			f.Remove(id)
		}
	}
	l.Close()
	if err != nil {
		return fmt.Errorf("layer %s: unmount %s: %w", l.desc.Digest, dir, err)
	}
	return nil
}

// Close stops the layer's background work and fetches and releases its
// fetcher. Reads of it fail from then on. Close does not unmount: Unmount
// does both.
func (l *Layer) Close() {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return
	}
	l.closed = true
	l.mu.Unlock()
	l.cancel()
	<-l.done
	l.chunks.Close()
	closeFetcher(l.fetcher)
	// Retired under the lock that the metrics read under: a scrape sees
	// the layer open or retired, never both or neither.
	l.m.mu.Lock()
	if l.m.layers[l] {
		l.m.retireLocked(l.chunks.Stats().Sources)
	}
	delete(l.m.layers, l)
	l.m.mu.Unlock()
}

// fetchAhead fetches the prioritized region in one request, then the rest
// of the layer in batches, yielding to reads a container is waiting on.
func (l *Layer) fetchAhead() {
	defer close(l.done)
	defer func() {
		if p := recover(); p != nil {
			l.m.o.Logger.Error("panic in background fetch", "layer", l.desc.Digest, "panic", p, "stack", string(debug.Stack()))
		}
	}()
	ctx := l.ctx
	fs := l.m.o.FS
	if !fs.Prefetch && !fs.BackgroundFetch {
		return
	}
	chunks := l.index.Chunks()
	rest := chunks
	if fs.Prefetch && l.index.Landmark > 0 {
		i := sort.Search(len(chunks), func(i int) bool { return chunks[i].Offset >= l.index.Landmark })
		if err := l.chunks.Prefetch(ctx, chunks[:i]); err != nil && ctx.Err() == nil {
			l.m.o.Logger.Warn("prefetch failed", "layer", l.desc.Digest, "err", err)
		} else {
			l.m.o.Logger.Debug("prefetched", "layer", l.desc.Digest, "bytes", l.index.Landmark)
		}
		rest = chunks[i:]
	}
	if !fs.BackgroundFetch {
		return
	}
	t := time.NewTimer(fs.BackgroundFetchDelay)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
		return
	}
	// Small batches, so that a read the container waits on is never queued
	// behind much background traffic.
	const batch = 1 << 20
	for len(rest) > 0 {
		if err := l.chunks.WaitIdle(ctx); err != nil {
			return
		}
		n, start := 0, rest[0].Offset
		for n < len(rest) && rest[n].End-start <= batch {
			n++
		}
		n = max(n, 1)
		if err := l.chunks.Background(ctx, rest[:n]); err != nil {
			if ctx.Err() == nil {
				l.m.o.Logger.Warn("background fetch stopped", "layer", l.desc.Digest, "err", err)
			}
			return
		}
		rest = rest[n:]
	}
}

// Status is what `starling status` shows of the lazy layers of a node.
type Status struct {
	// Mount is the lazy filesystem's mountpoint ("" until the first layer).
	Mount string `json:"mount"`
	// ReadMode says how local files are served: "passthrough" (the kernel
	// reads the chunk store's files) or "fuse" (through starlingd).
	ReadMode string        `json:"read_mode"`
	Layers   []LayerStatus `json:"layers"`
}

// LayerStatus is one open layer.
type LayerStatus struct {
	Digest     string     `json:"digest"`
	Mountpoint string     `json:"mountpoint,omitempty"`
	Entries    int        `json:"entries"`
	Stats      blob.Stats `json:"stats"`
}

// Status reports the lazy filesystem's mode and every open layer.
func (m *Manager) Status() Status {
	m.mu.Lock()
	st := Status{ReadMode: "fuse", Layers: []LayerStatus{}}
	if m.fs != nil {
		st.Mount = m.fs.Dir()
		if m.fs.Passthrough() {
			st.ReadMode = "passthrough"
		}
	} else if m.o.FS.Passthrough {
		st.ReadMode = "passthrough (if the kernel offers it)"
	}
	ls := make([]*Layer, 0, len(m.layers))
	for l := range m.layers {
		ls = append(ls, l)
	}
	m.mu.Unlock()
	for _, l := range ls {
		l.mu.Lock()
		dir := l.dir
		l.mu.Unlock()
		st.Layers = append(st.Layers, LayerStatus{Digest: l.desc.Digest.String(), Mountpoint: dir, Entries: l.index.Entries, Stats: l.chunks.Stats()})
	}
	sort.Slice(st.Layers, func(i, j int) bool {
		if st.Layers[i].Mountpoint != st.Layers[j].Mountpoint {
			return st.Layers[i].Mountpoint < st.Layers[j].Mountpoint
		}
		return st.Layers[i].Digest < st.Layers[j].Digest
	})
	return st
}
