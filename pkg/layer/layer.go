// Package layer resolves lazily mountable layers — reads and checks their
// TOC — and mounts them through FUSE, with prefetch of the prioritized region
// and background fetch of the rest.
package layer

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"

	"github.com/starling-dev/starling/pkg/blob"
	"github.com/starling-dev/starling/pkg/chunkcache"
	"github.com/starling-dev/starling/pkg/config"
	"github.com/starling-dev/starling/pkg/lazyfs"
	"github.com/starling-dev/starling/pkg/registry"
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

// FetcherFactory makes the Fetcher of a layer's blob; the P2P peer plugs in here.
type FetcherFactory func(repo name.Repository, desc v1.Descriptor) blob.Fetcher

// Options configures a Manager.
type Options struct {
	Root    string // state directory: the chunk cache lives in Root/chunks
	Client  *registry.Client
	FS      config.FS
	Fetcher FetcherFactory // nil: ranged reads from the registry
	Logger  *slog.Logger
}

// Manager resolves and mounts layers; it owns the shared chunk cache.
type Manager struct {
	o     Options
	cache *chunkcache.Cache
}

// NewManager opens the chunk cache.
func NewManager(o Options) (*Manager, error) {
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.FS.TailFetchSize <= 0 {
		o.FS.TailFetchSize = config.DefaultFS().TailFetchSize
	}
	c, err := chunkcache.Open(filepath.Join(o.Root, "chunks"), o.FS.CacheSize)
	if err != nil {
		return nil, err
	}
	return &Manager{o: o, cache: c}, nil
}

// Close releases the manager. Mounted layers stay mounted.
func (m *Manager) Close() error { return nil }

// IsLazy reports whether desc carries what a lazy mount needs.
func IsLazy(desc v1.Descriptor) bool {
	_, ok := desc.Annotations[TOCDigestAnnotation]
	return ok
}

// Layer is a resolved layer, ready to mount.
type Layer struct {
	desc   v1.Descriptor
	reader *estargz.Reader
	chunks *blob.Reader
	m      *Manager

	mu     sync.Mutex
	dir    string
	server *fuse.Server
	cancel context.CancelFunc
	done   chan struct{}
}

// Resolve reads the layer's footer and TOC (usually in one request), checks
// the TOC against the descriptor's annotation, and refuses a TOC with an
// entry that would resolve outside the layer.
func (m *Manager) Resolve(ctx context.Context, repo name.Repository, desc v1.Descriptor) (*Layer, error) {
	want, ok := desc.Annotations[TOCDigestAnnotation]
	if !ok {
		return nil, fmt.Errorf("layer %s: %w: no %s annotation", desc.Digest, ErrNotLazy, TOCDigestAnnotation)
	}
	tocDigest, err := digest.Parse(want)
	if err != nil {
		return nil, fmt.Errorf("layer %s: bad TOC digest annotation %q: %w", desc.Digest, want, err)
	}
	var dec estargz.Decompressor
	switch desc.MediaType {
	case types.OCILayer, types.DockerLayer, "application/vnd.oci.image.layer.v1.tar+gzip+estargz":
		dec = new(estargz.GzipDecompressor)
	case types.OCILayerZStd:
		dec = new(zstdchunked.Decompressor)
	default:
		return nil, fmt.Errorf("layer %s: %w: media type %q", desc.Digest, ErrNotLazy, desc.MediaType)
	}
	var f blob.Fetcher
	if m.o.Fetcher != nil {
		f = m.o.Fetcher(repo, desc)
	} else {
		f = &blob.RegistryFetcher{Client: m.o.Client, Repo: repo, Digest: desc.Digest}
	}
	f = blob.Counted(f)
	size := desc.Size
	if size <= 0 {
		if size, err = m.o.Client.BlobSize(ctx, repo, desc.Digest); err != nil {
			return nil, fmt.Errorf("layer %s: %w", desc.Digest, err)
		}
	}
	ra := &tailReaderAt{ctx: ctx, f: f, size: size, tail: min(size, m.o.FS.TailFetchSize), timeout: m.o.FS.FetchTimeout}
	m.o.Logger.Debug("resolving layer", "layer", desc.Digest, "size", size)
	raw, _, err := toc.Read(ra, size, dec)
	if err != nil {
		return nil, fmt.Errorf("layer %s: read TOC: %w", desc.Digest, err)
	}
	if err := toc.Validate(raw); err != nil {
		return nil, fmt.Errorf("layer %s: %w", desc.Digest, err)
	}
	r, err := estargz.Open(io.NewSectionReader(ra, 0, size), estargz.WithDecompressors(dec))
	if err != nil {
		return nil, fmt.Errorf("layer %s: open TOC: %w", desc.Digest, err)
	}
	if _, err := r.VerifyTOC(tocDigest); err != nil {
		return nil, fmt.Errorf("layer %s: TOC does not match the annotation %s: %w", desc.Digest, tocDigest, err)
	}
	m.o.Logger.Debug("layer resolved", "layer", desc.Digest, "entries", len(raw.Entries))
	br := blob.NewReader(f, m.cache, blob.Options{
		Layer:        desc.Digest.String(),
		Decompressor: dec,
		FetchTimeout: m.o.FS.FetchTimeout,
		MaxMerge:     64 << 20,
		Logger:       m.o.Logger,
	})
	l := &Layer{desc: desc, reader: r, chunks: br, m: m}
	l.mu.Lock()
	l.startFetchAhead()
	l.mu.Unlock()
	return l, nil
}

// Close stops background work of a layer that was resolved but never mounted.
func (l *Layer) Close() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.server == nil && l.cancel != nil {
		l.cancel()
		<-l.done
	}
}

// Stats says what reading the layer has cost so far.
func (l *Layer) Stats() blob.Stats { return l.chunks.Stats() }

// Mount mounts the layer read-only at mountpoint and starts prefetch and
// background fetch as configured.
func (l *Layer) Mount(mountpoint string) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.server != nil {
		return fmt.Errorf("layer %s: already mounted", l.desc.Digest)
	}
	srv, err := lazyfs.Mount(mountpoint, &lazyfs.Layer{TOC: l.reader, Chunks: l.chunks, Name: l.desc.Digest.String(), Logger: l.m.o.Logger})
	if err != nil {
		return fmt.Errorf("layer %s: mount at %s: %w", l.desc.Digest, mountpoint, err)
	}
	if err := srv.WaitMount(); err != nil {
		_ = srv.Unmount()
		return fmt.Errorf("layer %s: mount at %s: %w", l.desc.Digest, mountpoint, err)
	}
	l.server = srv
	l.dir = mountpoint
	l.startFetchAhead()
	return nil
}

// startFetchAhead starts prefetch and background fetch once. Resolve calls
// it, so that the prioritized region is on its way while containerd is still
// pulling the other layers and creating the container.
func (l *Layer) startFetchAhead() {
	if l.done != nil {
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	l.cancel = cancel
	l.done = make(chan struct{})
	go l.fetchAhead(ctx)
}

// Unmount stops background work and unmounts.
func (l *Layer) Unmount() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.server == nil {
		return nil
	}
	l.cancel()
	<-l.done
	l.done = nil
	err := l.server.Unmount()
	if err != nil {
		// Busy: containers still use it as a lower layer. Detach it so the
		// daemon can stop; the kernel drops it when they are gone.
		if derr := unix.Unmount(l.dir, unix.MNT_DETACH); derr == nil {
			err = nil
		}
	}
	l.server = nil
	if err != nil {
		return fmt.Errorf("layer %s: unmount %s: %w", l.desc.Digest, l.dir, err)
	}
	return nil
}

// allChunks lists every chunk of the layer in blob order.
func (l *Layer) allChunks() []blob.Chunk {
	var out []blob.Chunk
	seen := map[string]bool{}
	var walk func(e *estargz.TOCEntry)
	walk = func(e *estargz.TOCEntry) {
		e.ForeachChild(func(_ string, c *estargz.TOCEntry) bool {
			switch c.Type {
			case "dir":
				walk(c)
			case "reg":
				if c.Size == 0 || seen[c.Name] {
					return true
				}
				seen[c.Name] = true
				for off := int64(0); off < c.Size; {
					ce, ok := l.reader.ChunkEntryForOffset(c.Name, off)
					if !ok {
						break
					}
					ch := blob.ChunkOf(ce, c.Size)
					out = append(out, ch)
					off = ce.ChunkOffset + ch.Size
				}
			}
			return true
		})
	}
	if root, ok := l.reader.Lookup(""); ok {
		walk(root)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Offset < out[j].Offset })
	return out
}

// fetchAhead fetches the prioritized region in one request, then the rest
// of the layer in batches, yielding to reads a container is waiting on.
func (l *Layer) fetchAhead(ctx context.Context) {
	defer close(l.done)
	fs := l.m.o.FS
	if !fs.Prefetch && !fs.BackgroundFetch {
		return
	}
	chunks := l.allChunks()
	var landmark int64 = -1
	if e, ok := l.reader.Lookup(estargz.PrefetchLandmark); ok {
		landmark = e.Offset
	}
	rest := chunks
	if fs.Prefetch && landmark > 0 {
		i := sort.Search(len(chunks), func(i int) bool { return chunks[i].Offset >= landmark })
		if err := l.chunks.Ensure(ctx, chunks[:i], false); err != nil && ctx.Err() == nil {
			l.m.o.Logger.Warn("prefetch failed", "layer", l.desc.Digest, "err", err)
		} else {
			l.m.o.Logger.Debug("prefetched", "layer", l.desc.Digest, "bytes", landmark)
		}
		rest = chunks[i:]
	}
	if !fs.BackgroundFetch {
		return
	}
	select {
	case <-time.After(fs.BackgroundFetchDelay):
	case <-ctx.Done():
		return
	}
	// Small batches, so that a read the container waits on is never queued
	// behind much background traffic.
	const batch = 1 << 20
	for len(rest) > 0 && ctx.Err() == nil {
		l.chunks.WaitIdle(ctx)
		n, start := 0, rest[0].Offset
		for n < len(rest) && rest[n].End-start <= batch {
			n++
		}
		if n == 0 {
			n = 1
		}
		if err := l.chunks.Ensure(ctx, rest[:n], false); err != nil {
			if ctx.Err() == nil {
				l.m.o.Logger.Warn("background fetch stopped", "layer", l.desc.Digest, "err", err)
			}
			return
		}
		rest = rest[n:]
	}
}
