// Package blob gives verified access to the chunks of a lazily read layer.
// A chunk is a compressed byte range of the layer's blob with a digest in the
// TOC; it comes from the local chunk cache or from a Fetcher (the registry,
// or later the P2P peer), is decompressed, checked against its digest and
// cached before anyone reads it.
package blob

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sync/singleflight"

	"github.com/starling-dev/starling/pkg/chunkcache"
	"github.com/starling-dev/starling/pkg/registry"
)

// Fetcher reads byte ranges of one blob. It is the seam between chunk access
// and where bytes come from.
type Fetcher interface {
	// Fetch returns length bytes of the blob from off.
	Fetch(ctx context.Context, off, length int64) (io.ReadCloser, error)
}

// RegistryFetcher fetches ranges of a blob from a registry with the
// registry client's auth, mirrors and retries.
type RegistryFetcher struct {
	Client *registry.Client
	Repo   name.Repository
	Digest v1.Hash
}

// Fetch implements Fetcher.
func (f *RegistryFetcher) Fetch(ctx context.Context, off, length int64) (io.ReadCloser, error) {
	return f.Client.BlobRange(ctx, f.Repo, f.Digest, off, length)
}

// ErrVerify is returned when a chunk does not match its digest.
var ErrVerify = errors.New("chunk does not match its digest")

// Chunk is one verifiable unit of a layer.
type Chunk struct {
	Offset int64  // compressed offset of its stream in the blob
	End    int64  // end of that compressed stream
	Inner  int64  // offset of the chunk's bytes inside the decompressed stream
	Size   int64  // uncompressed size
	Digest string // sha256 of the uncompressed bytes
}

// ChunkOf describes the chunk of a TOC entry returned by the estargz reader
// (a "reg" entry or one of its "chunk" entries).
func ChunkOf(e *estargz.TOCEntry, fileSize int64) Chunk {
	size := e.ChunkSize
	if size <= 0 {
		size = fileSize - e.ChunkOffset
	}
	return Chunk{Offset: e.Offset, End: e.NextOffset(), Inner: e.InnerOffset, Size: size, Digest: e.ChunkDigest}
}

// Stats counts what a Reader did.
type Stats struct {
	FetchRequests  int64 `json:"fetch_requests"`
	FetchedBytes   int64 `json:"fetched_bytes"`
	ChunksFetched  int64 `json:"chunks_fetched"`
	CacheHits      int64 `json:"cache_hits"`
	VerifyFailures int64 `json:"verify_failures"`
}

// Options configures a Reader.
type Options struct {
	// Layer names the layer in logs and errors.
	Layer string
	// Decompressor of the layer's format (gzip or zstd:chunked).
	Decompressor estargz.Decompressor
	// FetchTimeout bounds one fetch; a dead source gives an error, never a hang.
	FetchTimeout time.Duration
	// MaxMerge bounds how many compressed bytes one request may cover when
	// adjacent chunks are merged.
	MaxMerge int64
	Logger   *slog.Logger
}

// Reader serves chunks of one blob. It is safe for concurrent use.
type Reader struct {
	o       Options
	fetcher Fetcher
	cache   *chunkcache.Cache
	sf      singleflight.Group

	inflightMu sync.Mutex
	inflight   map[string]chan struct{} // chunk digest -> closed when its fetch ends

	waiting atomic.Int32 // foreground reads waiting for a fetch
	idle    *sync.Cond
	idleMu  sync.Mutex

	fetchRequests, fetchedBytes, chunksFetched, cacheHits, verifyFailures atomic.Int64
}

// NewReader returns a Reader of the blob behind f.
func NewReader(f Fetcher, cache *chunkcache.Cache, o Options) *Reader {
	if o.FetchTimeout <= 0 {
		o.FetchTimeout = 30 * time.Second
	}
	if o.MaxMerge <= 0 {
		o.MaxMerge = 16 << 20
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	r := &Reader{o: o, fetcher: f, cache: cache, inflight: map[string]chan struct{}{}}
	r.idle = sync.NewCond(&r.idleMu)
	return r
}

// Stats returns the counters so far.
func (r *Reader) Stats() Stats {
	return Stats{
		FetchRequests:  r.fetchRequests.Load(),
		FetchedBytes:   r.fetchedBytes.Load(),
		ChunksFetched:  r.chunksFetched.Load(),
		CacheHits:      r.cacheHits.Load(),
		VerifyFailures: r.verifyFailures.Load(),
	}
}

// ReadAt reads from the uncompressed bytes of chunk c, at off within it,
// fetching and verifying the chunk first if needed.
func (r *Reader) ReadAt(ctx context.Context, c Chunk, p []byte, off int64) (int, error) {
	if n, ok := r.cache.ReadAt(c.Digest, p, off); ok {
		r.cacheHits.Add(1)
		return n, nil
	}
	if err := r.Ensure(ctx, []Chunk{c}, true); err != nil {
		return 0, err
	}
	if n, ok := r.cache.ReadAt(c.Digest, p, off); ok {
		return n, nil
	}
	return 0, fmt.Errorf("layer %s chunk %s: vanished from the cache", r.o.Layer, c.Digest)
}

// Ensure makes every chunk of cs present in the cache. Missing chunks that
// are adjacent in the blob are fetched in one request. Foreground calls
// pause background ones.
func (r *Reader) Ensure(ctx context.Context, cs []Chunk, foreground bool) error {
	var missing []Chunk
	seen := make(map[string]bool, len(cs))
	for _, c := range cs {
		if !seen[c.Digest] && !r.cache.Has(c.Digest) {
			seen[c.Digest] = true
			missing = append(missing, c)
		}
	}
	if len(missing) == 0 {
		return nil
	}
	if foreground {
		r.waiting.Add(1)
		defer func() {
			if r.waiting.Add(-1) == 0 {
				r.idle.Broadcast()
			}
		}()
	}
	// Chunks another fetch (a prefetch, another read) is already bringing
	// are waited for, not fetched twice.
	var mine []Chunk
	var waits []chan struct{}
	r.inflightMu.Lock()
	for _, c := range missing {
		if ch, ok := r.inflight[c.Digest]; ok {
			waits = append(waits, ch)
			continue
		}
		r.inflight[c.Digest] = make(chan struct{})
		mine = append(mine, c)
	}
	r.inflightMu.Unlock()
	defer func() {
		r.inflightMu.Lock()
		for _, c := range mine {
			if ch, ok := r.inflight[c.Digest]; ok {
				close(ch)
				delete(r.inflight, c.Digest)
			}
		}
		r.inflightMu.Unlock()
	}()
	sort.Slice(mine, func(i, j int) bool { return mine[i].Offset < mine[j].Offset })
	for _, g := range r.groups(mine) {
		if err := r.fetchGroup(ctx, g); err != nil {
			return err
		}
	}
	for _, ch := range waits {
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	// What the other fetch failed to bring, fetch now.
	var left []Chunk
	for _, c := range missing {
		if !r.cache.Has(c.Digest) {
			left = append(left, c)
		}
	}
	if len(left) > 0 && len(waits) > 0 {
		return r.Ensure(ctx, left, foreground)
	}
	return nil
}

// WaitIdle blocks while foreground reads are waiting for fetches, so that
// background fetching yields to a container waiting on a read.
func (r *Reader) WaitIdle(ctx context.Context) {
	r.idleMu.Lock()
	defer r.idleMu.Unlock()
	for r.waiting.Load() > 0 && ctx.Err() == nil {
		r.idle.Wait()
	}
}

// groups splits sorted chunks into runs that are contiguous (or share a
// compressed stream) in the blob.
func (r *Reader) groups(cs []Chunk) [][]Chunk {
	var out [][]Chunk
	var cur []Chunk
	var start, end int64
	for _, c := range cs {
		if len(cur) > 0 && c.Offset <= end && c.End-start <= r.o.MaxMerge {
			cur = append(cur, c)
			if c.End > end {
				end = c.End
			}
			continue
		}
		if len(cur) > 0 {
			out = append(out, cur)
		}
		cur, start, end = []Chunk{c}, c.Offset, c.End
	}
	if len(cur) > 0 {
		out = append(out, cur)
	}
	return out
}

func (r *Reader) fetchGroup(ctx context.Context, g []Chunk) error {
	start, end := g[0].Offset, g[0].End
	for _, c := range g {
		if c.End > end {
			end = c.End
		}
	}
	key := fmt.Sprintf("%d-%d", start, end)
	_, err, _ := r.sf.Do(key, func() (any, error) {
		var err error
		for attempt := 0; attempt < 2; attempt++ {
			if err = r.fetchOnce(ctx, g, start, end); !errors.Is(err, ErrVerify) {
				return nil, err
			}
			// A chunk that does not match may be a transient corruption on
			// the way; fetch once more before giving up.
		}
		return nil, err
	})
	return err
}

func (r *Reader) fetchOnce(ctx context.Context, g []Chunk, start, end int64) error {
	fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), r.o.FetchTimeout)
	defer cancel()
	r.fetchRequests.Add(1)
	rc, err := r.fetcher.Fetch(fctx, start, end-start)
	if err != nil {
		return fmt.Errorf("fetch bytes %d-%d of layer %s: %w", start, end-1, r.o.Layer, err)
	}
	buf := make([]byte, end-start)
	n, err := io.ReadFull(rc, buf)
	rc.Close()
	r.fetchedBytes.Add(int64(n))
	if err != nil {
		return fmt.Errorf("fetch bytes %d-%d of layer %s: %w", start, end-1, r.o.Layer, err)
	}
	for _, c := range g {
		if r.cache.Has(c.Digest) {
			continue
		}
		data, err := r.decode(buf[c.Offset-start:c.End-start], c)
		if err != nil {
			return err
		}
		if err := r.cache.Put(c.Digest, data); err != nil {
			return fmt.Errorf("layer %s chunk %s: %w", r.o.Layer, c.Digest, err)
		}
		r.chunksFetched.Add(1)
	}
	return nil
}

// decode decompresses a chunk's stream, cuts the chunk out and verifies it.
func (r *Reader) decode(stream []byte, c Chunk) ([]byte, error) {
	dr, err := r.o.Decompressor.Reader(bytes.NewReader(stream))
	if err != nil {
		return nil, r.verifyFailed(c, fmt.Errorf("decompress: %w", err))
	}
	defer dr.Close()
	if _, err := io.CopyN(io.Discard, dr, c.Inner); err != nil {
		return nil, r.verifyFailed(c, fmt.Errorf("decompress: %w", err))
	}
	data := make([]byte, c.Size)
	if _, err := io.ReadFull(dr, data); err != nil {
		return nil, r.verifyFailed(c, fmt.Errorf("decompress: %w", err))
	}
	want, err := digest.Parse(c.Digest)
	if err != nil {
		return nil, fmt.Errorf("layer %s: chunk at %d has no usable digest %q: %w", r.o.Layer, c.Offset, c.Digest, err)
	}
	if got := want.Algorithm().FromBytes(data); got != want {
		return nil, r.verifyFailed(c, fmt.Errorf("got %s", got))
	}
	return data, nil
}

func (r *Reader) verifyFailed(c Chunk, cause error) error {
	r.verifyFailures.Add(1)
	metricVerifyFailures.Inc()
	r.o.Logger.Error("chunk verification failed", "layer", r.o.Layer, "chunk", c.Digest, "offset", c.Offset, "err", cause)
	return fmt.Errorf("layer %s chunk %s at %d: %w: %v", r.o.Layer, c.Digest, c.Offset, ErrVerify, cause)
}
