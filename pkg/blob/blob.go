// Package blob gives verified access to the chunks of a lazily read layer.
// A chunk is a compressed byte range of the layer's blob with a digest in the
// TOC; it comes from the node's chunk store or from a Fetcher (the registry,
// or the P2P peer), is decompressed, checked against its digest and stored
// before anyone reads it.
//
// Reads a container waits on ("demand") fetch exactly the chunks that cover
// them. Read-ahead starts after the demand it follows has arrived, prefetch
// runs at once, and background fetch yields while any demand is waiting, so
// nothing a reader did not ask for sits in front of its bytes.
package blob

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime/debug"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/opencontainers/go-digest"

	"github.com/starling-dev/starling/pkg/originq"
	"github.com/starling-dev/starling/pkg/toc"
)

// Fetcher reads byte ranges of one blob. It is the seam between chunk access
// and where bytes come from.
type Fetcher interface {
	// Fetch returns length bytes of the blob from off.
	Fetch(ctx context.Context, off, length int64) (io.ReadCloser, error)
}

// DirectFetcher is a Fetcher that can also read from the origin itself,
// bypassing what sits in between (the P2P network). After bytes fail
// verification the Reader asks for them this way, so that a corrupt peer
// costs a refetch, not the read.
type DirectFetcher interface {
	Fetcher
	FetchDirect(ctx context.Context, off, length int64) (io.ReadCloser, error)
}

// RangeReader is the part of a registry client that a RegistryFetcher needs.
type RangeReader interface {
	BlobRange(ctx context.Context, repo name.Repository, h v1.Hash, off, length int64) (io.ReadCloser, error)
}

// RegistryFetcher fetches ranges of a blob from a registry with the
// registry client's auth, mirrors and retries.
type RegistryFetcher struct {
	Client RangeReader
	Repo   name.Repository
	Digest v1.Hash
}

// Fetch implements Fetcher.
func (f *RegistryFetcher) Fetch(ctx context.Context, off, length int64) (io.ReadCloser, error) {
	return f.Client.BlobRange(ctx, f.Repo, f.Digest, off, length)
}

// Where a layer's bytes came from, the keys of Stats.Sources.
const (
	// SourceCache is bytes read by the layer's readers that were in the
	// chunk store already (uncompressed): no fetch.
	SourceCache = "cache"
	// SourceLocal is blob bytes the fetcher had on this node (the peer's
	// storage).
	SourceLocal = "local"
	// SourcePeer is blob bytes from another peer.
	SourcePeer = "peer"
	// SourceOrigin is blob bytes from the registry.
	SourceOrigin = "origin"
)

// Sources lists the sources in the order they are shown.
var Sources = []string{SourceCache, SourceLocal, SourcePeer, SourceOrigin}

// SourceStats is implemented by fetchers that know where the bytes they
// returned came from. A fetcher that does not is the origin: the Reader
// counts its bytes and the time its fetches took as SourceOrigin.
type SourceStats interface {
	// BytesBySource returns the bytes returned so far, by source: "local"
	// (peer storage on this node), "peer", "origin".
	BytesBySource() map[string]int64
	// WaitBySource returns the time Fetch calls waited, by the source
	// that answered.
	WaitBySource() map[string]time.Duration
}

// SourceCount is what one source gave a layer.
type SourceCount struct {
	Bytes       int64   `json:"bytes"`
	WaitSeconds float64 `json:"wait_seconds"`
}

// fetcherAs finds what f implements of T, looking through wrappers
// (Counted) that have Unwrap.
func fetcherAs[T any](f Fetcher) (T, bool) {
	for f != nil {
		if t, ok := f.(T); ok {
			return t, true
		}
		u, ok := f.(interface{ Unwrap() Fetcher })
		if !ok {
			break
		}
		f = u.Unwrap()
	}
	var zero T
	return zero, false
}

// sourceStatsOf finds the SourceStats of f, nil when it has none.
func sourceStatsOf(f Fetcher) SourceStats {
	s, _ := fetcherAs[SourceStats](f)
	return s
}

// Store holds verified, decompressed chunks by digest: one copy of a chunk
// per node, whatever layers share it.
type Store interface {
	Has(digest string) bool
	// ReadAt reads part of a stored chunk; ok is false when it is not
	// stored (any more: a store may evict between Has and ReadAt).
	ReadAt(digest string, p []byte, off int64) (n int, ok bool)
	// Put stores bytes the caller verified against digest.
	Put(digest string, data []byte) error
}

// FileStore is a Store whose chunks are files, so that a file whose bytes
// are all local can be handed to the kernel (FUSE passthrough).
type FileStore interface {
	Store
	// OpenFile opens the stored chunk, or ok=false.
	OpenFile(digest string) (f *os.File, ok bool)
	// PutFile stores size bytes written by fill under digest; fill's bytes
	// are verified against digest before they are visible.
	PutFile(digest string, size int64, fill func(io.Writer) error) error
}

// Confirmer is implemented by fetchers that keep what they fetched for
// others (the P2P peer): the reader tells them which bytes matched their
// chunk's digest, and only those are offered to other nodes.
type Confirmer interface {
	Verified(off, length int64)
}

// Confirm tells f, if it is (or wraps) a Confirmer, that [off, off+n)
// was verified: the layer's footer and TOC, say, once the TOC matched its
// digest.
func Confirm(f Fetcher, off, n int64) {
	if c, ok := fetcherAs[Confirmer](f); ok {
		c.Verified(off, n)
	}
}

// ErrVerify is returned when a chunk does not match its digest.
var ErrVerify = errors.New("chunk does not match its digest")

// ErrClosed is returned to reads of a layer that was closed (unmounted,
// removed, daemon shutting down).
var ErrClosed = errors.New("layer closed")

// Chunk is one verifiable unit of a layer.
type Chunk = toc.Chunk

// Stats counts what a Reader did.
type Stats struct {
	FetchRequests  int64 `json:"fetch_requests"`
	FetchedBytes   int64 `json:"fetched_bytes"`
	ChunksFetched  int64 `json:"chunks_fetched"`
	CacheHits      int64 `json:"cache_hits"`
	VerifyFailures int64 `json:"verify_failures"`
	// Sources says where the layer's bytes came from (keys in Sources),
	// and how long fetches waited on each. Blob bytes include the
	// footer and TOC read at resolve; "cache" is bytes that reads found
	// in the chunk store (reads the kernel serves by passthrough never
	// reach starlingd and are not counted).
	Sources map[string]SourceCount `json:"sources,omitempty"`
}

// Options configures a Reader.
type Options struct {
	// Layer names the layer in logs and errors.
	Layer string
	// Decompressor of the layer's format (gzip or zstd:chunked).
	Decompressor estargz.Decompressor
	// FetchTimeout bounds getting a chunk, all attempts together: a dead or
	// stalled source gives an error after this long, never a hang.
	FetchTimeout time.Duration
	// Attempts is how often one fetch is tried within FetchTimeout.
	Attempts int
	// MaxMerge bounds how many compressed bytes one request may cover when
	// adjacent chunks are merged.
	MaxMerge int64
	// ReadAheadRequests bounds read-ahead fetches in flight; more are dropped.
	ReadAheadRequests int
	Logger            *slog.Logger
}

// Reader serves chunks of one blob. It is safe for concurrent use. Close
// ends every fetch and wait it owns.
type Reader struct {
	o       Options
	fetcher Fetcher
	store   Store
	sources SourceStats // nil: the fetcher is the origin, counted here

	ctx    context.Context // the Reader's life: fetches run under it
	cancel context.CancelFunc
	wg     sync.WaitGroup
	raSem  chan struct{}

	mu       sync.Mutex
	inflight map[string]*fetch // chunk digest -> its fetch
	demand   int               // demand reads waiting on fetches
	idle     chan struct{}     // closed while demand == 0
	// files being assembled for passthrough, by content digest
	assembling map[string]bool
	// spill holds verified chunks the store refused (full disk, quota
	// taken by pinned chunks), so that the reads waiting on them get their
	// bytes all the same; oldest first out past maxSpill bytes.
	spill      map[string][]byte
	spillOrder []string
	spillBytes int64
	// failed remembers, briefly, chunks whose fetch just gave up: the
	// kernel retries a failed page read at once (and reads ahead around
	// it), and each retry would otherwise wait out another FetchTimeout.
	failed map[string]failure

	fetchRequests, fetchedBytes, chunksFetched, cacheHits, verifyFailures atomic.Int64
	// cacheBytes are bytes read from the store without a fetch;
	// originBytes and originWait (ns) count what a fetcher without
	// SourceStats returned and how long its requests took.
	cacheBytes, originBytes, originWait atomic.Int64
}

// maxSpill bounds the verified chunks a Reader keeps in memory when the
// store cannot take them.
const maxSpill = 32 << 20

// has reports whether a chunk's bytes are at hand, in the store or spilled.
func (r *Reader) has(d string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.hasLocked(d)
}

func (r *Reader) hasLocked(d string) bool {
	if r.store.Has(d) {
		return true
	}
	_, ok := r.spill[d]
	return ok
}

// readSpilled reads from a spilled chunk.
func (r *Reader) readSpilled(d string, p []byte, off int64) (int, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	b, ok := r.spill[d]
	if !ok || off > int64(len(b)) {
		return 0, false
	}
	return copy(p, b[off:]), true
}

// keep holds a verified chunk that the store refused.
func (r *Reader) keep(d string, data []byte) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.spill == nil {
		r.spill = map[string][]byte{}
	}
	if _, ok := r.spill[d]; ok {
		return
	}
	r.spill[d] = data
	r.spillOrder = append(r.spillOrder, d)
	r.spillBytes += int64(len(data))
	for r.spillBytes > maxSpill && len(r.spillOrder) > 1 {
		old := r.spillOrder[0]
		r.spillOrder = r.spillOrder[1:]
		r.spillBytes -= int64(len(r.spill[old]))
		delete(r.spill, old)
	}
}

// failMemory is how long a chunk whose fetch gave up fails at once.
const failMemory = 500 * time.Millisecond

type failure struct {
	at  time.Time
	err error
}

// fetch is one chunk on its way.
type fetch struct {
	done chan struct{}
	err  error
	// level is the priority of the request that brings the chunk on the
	// origin link; a more urgent reader that waits on it raises it.
	level *originq.Level
}

// NewReader returns a Reader of the blob behind f.
func NewReader(f Fetcher, store Store, o Options) *Reader {
	if o.FetchTimeout <= 0 {
		o.FetchTimeout = 30 * time.Second
	}
	if o.Attempts <= 0 {
		o.Attempts = 3
	}
	if o.MaxMerge <= 0 {
		o.MaxMerge = 16 << 20
	}
	if o.ReadAheadRequests <= 0 {
		o.ReadAheadRequests = 4
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	ctx, cancel := context.WithCancel(context.Background())
	idle := make(chan struct{})
	close(idle)
	return &Reader{
		o: o, fetcher: f, store: store, sources: sourceStatsOf(f),
		ctx: ctx, cancel: cancel,
		raSem:    make(chan struct{}, o.ReadAheadRequests),
		inflight: map[string]*fetch{},
		idle:     idle,
	}
}

// Close cancels every fetch of the Reader and waits for its goroutines.
// Waiting reads return ErrClosed at once.
func (r *Reader) Close() {
	r.mu.Lock()
	r.cancel()
	r.mu.Unlock()
	r.wg.Wait()
}

// goOwned runs f in a goroutine that Close waits for, unless the Reader is
// closed already. Add happens under mu, after the check, so that no Add
// races Close's Wait.
func (r *Reader) goOwned(f func()) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.ctx.Err() != nil {
		return false
	}
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		f()
	}()
	return true
}

// Stats returns the counters so far.
func (r *Reader) Stats() Stats {
	src := make(map[string]SourceCount, len(Sources))
	for _, s := range Sources {
		src[s] = SourceCount{}
	}
	src[SourceCache] = SourceCount{Bytes: r.cacheBytes.Load()}
	if r.sources != nil {
		for k, n := range r.sources.BytesBySource() {
			c := src[k]
			c.Bytes += n
			src[k] = c
		}
		for k, d := range r.sources.WaitBySource() {
			c := src[k]
			c.WaitSeconds += d.Seconds()
			src[k] = c
		}
	} else {
		src[SourceOrigin] = SourceCount{Bytes: r.originBytes.Load(), WaitSeconds: time.Duration(r.originWait.Load()).Seconds()}
	}
	return Stats{
		FetchRequests:  r.fetchRequests.Load(),
		FetchedBytes:   r.fetchedBytes.Load(),
		ChunksFetched:  r.chunksFetched.Load(),
		CacheHits:      r.cacheHits.Load(),
		VerifyFailures: r.verifyFailures.Load(),
		Sources:        src,
	}
}

// FetchRange reads length bytes of the blob at off through the Reader's
// fetcher, outside the chunks (the footer and TOC at resolve), counted in
// the Reader's sources like its chunk fetches. It runs under ctx at the
// priority ctx carries (Demand when none).
func (r *Reader) FetchRange(ctx context.Context, off, length int64) (io.ReadCloser, error) {
	t0 := time.Now()
	rc, err := r.fetcher.Fetch(ctx, off, length)
	if r.sources != nil {
		return rc, err
	}
	if err != nil {
		r.originWait.Add(int64(time.Since(t0)))
		return nil, err
	}
	return &originBody{ReadCloser: rc, r: r, t0: t0}, nil
}

// originBody counts a fetcher's bytes as the origin's, and the time from
// the request to Close as its wait.
type originBody struct {
	io.ReadCloser
	r    *Reader
	t0   time.Time
	once sync.Once
}

func (b *originBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	b.r.originBytes.Add(int64(n))
	return n, err
}

func (b *originBody) Close() error {
	err := b.ReadCloser.Close()
	b.once.Do(func() { b.r.originWait.Add(int64(time.Since(b.t0))) })
	return err
}

// Local reports whether every chunk of cs is stored.
func (r *Reader) Local(cs []Chunk) bool {
	for _, c := range cs {
		if !r.store.Has(c.Digest) {
			return false
		}
	}
	return true
}

// ReadAt reads from the uncompressed bytes of chunk c, at off within it,
// fetching and verifying the chunk first if needed. A chunk evicted between
// its fetch and this read is fetched again.
func (r *Reader) ReadAt(ctx context.Context, c Chunk, p []byte, off int64) (int, error) {
	for attempt := 0; ; attempt++ {
		if n, ok := r.store.ReadAt(c.Digest, p, off); ok {
			if attempt == 0 {
				r.cacheHits.Add(1)
				r.cacheBytes.Add(int64(n))
			}
			return n, nil
		}
		if n, ok := r.readSpilled(c.Digest, p, off); ok {
			if attempt == 0 {
				r.cacheBytes.Add(int64(n))
			}
			return n, nil
		}
		if attempt == 3 {
			return 0, fmt.Errorf("layer %s chunk %s: evicted from the chunk store as soon as it was fetched (store too small for the reads in flight?)", r.o.Layer, c.Digest)
		}
		if err := r.Ensure(ctx, []Chunk{c}); err != nil {
			return 0, err
		}
	}
}

// Ensure makes every chunk of cs present in the store, for a reader that
// waits on them: background fetching yields while it waits.
func (r *Reader) Ensure(ctx context.Context, cs []Chunk) error {
	// Most reads find their chunks stored: they neither wait nor pause
	// the background fetch.
	if r.Local(cs) {
		return nil
	}
	r.mu.Lock()
	if r.demand == 0 {
		r.idle = make(chan struct{})
	}
	r.demand++
	r.mu.Unlock()
	defer func() {
		r.mu.Lock()
		if r.demand--; r.demand == 0 {
			close(r.idle)
		}
		r.mu.Unlock()
	}()
	return r.ensure(ctx, cs, originq.Demand)
}

// Prefetch fetches cs for no reader in particular, at Prefetch priority on
// the origin link (the prioritized region). Readers that need one of them
// wait for it instead of fetching it again, and raise its priority.
func (r *Reader) Prefetch(ctx context.Context, cs []Chunk) error {
	return r.ensure(ctx, cs, originq.Prefetch)
}

// Background fetches cs like Prefetch, at Background priority on the
// origin link (the rest of a layer, after its prioritized region).
func (r *Reader) Background(ctx context.Context, cs []Chunk) error {
	return r.ensure(ctx, cs, originq.Background)
}

// ReadAhead starts fetching cs without waiting for them. Read-ahead beyond
// ReadAheadRequests in flight is dropped: it is a guess, not a need.
func (r *Reader) ReadAhead(cs []Chunk) {
	if len(cs) == 0 || r.Local(cs) {
		return
	}
	select {
	case r.raSem <- struct{}{}:
	default:
		return
	}
	ok := r.goOwned(func() {
		defer func() { <-r.raSem }()
		defer r.recoverInto("read-ahead")
		// Errors were logged by the fetch; a read that needs these chunks
		// will try again.
		_ = r.ensure(r.ctx, cs, originq.Prefetch)
	})
	if !ok {
		<-r.raSem
	}
}

// WaitIdle blocks while demand reads are waiting for fetches, so that
// background fetching yields to a container waiting on a read.
func (r *Reader) WaitIdle(ctx context.Context) error {
	r.mu.Lock()
	ch := r.idle
	r.mu.Unlock()
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-r.ctx.Done():
		return ErrClosed
	}
}

// ensure claims the missing chunks of cs that nobody fetches yet, starts
// their fetch at priority prio, and waits for all of cs, raising the
// priority of the fetches of others it waits on to prio. A chunk whose
// fetch by someone else failed is claimed and fetched again, a bounded
// number of times.
func (r *Reader) ensure(ctx context.Context, cs []Chunk, prio originq.Priority) error {
	var lastErr error
	for round := 0; round < 3; round++ {
		var waits []*fetch
		var mine []Chunk
		lvl := originq.NewLevel(prio)
		seen := make(map[string]bool, len(cs))
		r.mu.Lock()
		if r.ctx.Err() != nil {
			r.mu.Unlock()
			return fmt.Errorf("layer %s: %w", r.o.Layer, ErrClosed)
		}
		for _, c := range cs {
			if seen[c.Digest] {
				continue
			}
			seen[c.Digest] = true
			if fl, ok := r.failed[c.Digest]; ok && time.Since(fl.at) < failMemory && !r.hasLocked(c.Digest) {
				r.mu.Unlock()
				r.start(mine, lvl)
				return fl.err
			}
			if f, ok := r.inflight[c.Digest]; ok {
				waits = append(waits, f)
				continue
			}
			if r.hasLocked(c.Digest) {
				continue
			}
			f := &fetch{done: make(chan struct{}), level: lvl}
			r.inflight[c.Digest] = f
			waits = append(waits, f)
			mine = append(mine, c)
		}
		r.mu.Unlock()
		if len(waits) == 0 {
			return nil
		}
		// Fetches of others this waits on go at least at its priority
		// (not under r.mu: a raise takes the gate's lock).
		for _, f := range waits {
			f.level.Raise(prio)
		}
		r.start(mine, lvl)
		failed := false
		for _, f := range waits {
			select {
			case <-f.done:
				if f.err != nil {
					failed, lastErr = true, f.err
				}
			case <-ctx.Done():
				return fmt.Errorf("layer %s: %w", r.o.Layer, ctx.Err())
			case <-r.ctx.Done():
				return fmt.Errorf("layer %s: %w", r.o.Layer, ErrClosed)
			}
		}
		if !failed {
			return nil
		}
		if errors.Is(lastErr, ErrClosed) || ctx.Err() != nil {
			return lastErr
		}
		// Our own fetches already tried Attempts times; only retry chunks
		// that someone else's fetch failed to bring.
		if len(mine) == len(waits) {
			return lastErr
		}
	}
	return lastErr
}

// start fetches claimed chunks in Reader-owned goroutines, one per run of
// adjacent chunks, so that no caller's cancellation cuts a fetch others
// wait on, and Close ends them all. Their requests go out at lvl.
func (r *Reader) start(mine []Chunk, lvl *originq.Level) {
	if len(mine) == 0 {
		return
	}
	sort.Slice(mine, func(i, j int) bool {
		if mine[i].Offset != mine[j].Offset {
			return mine[i].Offset < mine[j].Offset
		}
		return mine[i].Inner < mine[j].Inner
	})
	for _, g := range r.groups(mine) {
		if !r.goOwned(func() { r.finish(g, r.fetchGroup(g, lvl)) }) {
			r.finish(g, fmt.Errorf("layer %s: %w", r.o.Layer, ErrClosed))
		}
	}
}

// finish releases the claims of g with the outcome of its fetch.
func (r *Reader) finish(g []Chunk, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, c := range g {
		f, ok := r.inflight[c.Digest]
		if !ok {
			continue
		}
		delete(r.inflight, c.Digest)
		if err != nil && !r.hasLocked(c.Digest) {
			f.err = err
			if !errors.Is(err, ErrClosed) {
				if r.failed == nil || len(r.failed) > 1024 {
					r.failed = map[string]failure{}
				}
				r.failed[c.Digest] = failure{time.Now(), err}
			}
		} else {
			delete(r.failed, c.Digest)
		}
		close(f.done)
	}
}

// groups splits sorted chunks into runs that are contiguous (or share a
// compressed stream) in the blob.
func (r *Reader) groups(cs []Chunk) [][]Chunk {
	var out [][]Chunk
	var cur []Chunk
	var start, end int64
	for _, c := range cs {
		if len(cur) > 0 && c.Offset <= end && max(c.End, end)-start <= r.o.MaxMerge {
			cur = append(cur, c)
			end = max(end, c.End)
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

// fetchGroup gets one run of chunks at lvl, retrying within FetchTimeout.
// It logs one line when it gives up.
func (r *Reader) fetchGroup(g []Chunk, lvl *originq.Level) (err error) {
	defer func() {
		if p := recover(); p != nil {
			r.o.Logger.Error("panic in layer fetch", "layer", r.o.Layer, "panic", p, "stack", string(debug.Stack()))
			err = fmt.Errorf("layer %s chunk %s: internal error: %v", r.o.Layer, g[0].Digest, p)
		}
	}()
	start, end := g[0].Offset, g[0].End
	for _, c := range g {
		end = max(end, c.End)
	}
	ctx, cancel := context.WithTimeout(originq.WithLevel(r.ctx, lvl), r.o.FetchTimeout)
	defer cancel()
	verifyFailures := 0
	fetch := r.fetcher.Fetch
	for attempt := 1; ; attempt++ {
		err = r.fetchOnce(ctx, fetch, g, start, end)
		if err == nil {
			return nil
		}
		if r.ctx.Err() != nil {
			return fmt.Errorf("layer %s: %w", r.o.Layer, ErrClosed)
		}
		if errors.Is(err, ErrVerify) {
			// A chunk that does not match may be corrupted on the way or
			// by a peer; fetch once more, from the origin itself where the
			// fetcher can, before giving up.
			if verifyFailures++; verifyFailures >= 2 {
				break
			}
			if d, ok := r.fetcher.(DirectFetcher); ok {
				fetch = d.FetchDirect
			}
		}
		if attempt >= r.o.Attempts || ctx.Err() != nil {
			break
		}
		select {
		case <-time.After(time.Duration(attempt) * 100 * time.Millisecond):
		case <-ctx.Done():
		}
		if ctx.Err() != nil {
			break
		}
	}
	r.o.Logger.Error("chunk fetch failed", "layer", r.o.Layer, "chunk", g[0].Digest, "chunks", len(g),
		"bytes", fmt.Sprintf("%d-%d", start, end-1), "err", err)
	return err
}

// fetchOnce makes one request for [start,end) and stores each chunk as soon
// as its bytes have arrived, so that a reader of the first chunk of a long
// run does not wait for the rest.
func (r *Reader) fetchOnce(ctx context.Context, fetch func(ctx context.Context, off, length int64) (io.ReadCloser, error), g []Chunk, start, end int64) error {
	r.fetchRequests.Add(1)
	t0 := time.Now()
	rc, err := fetch(ctx, start, end-start)
	if r.sources == nil {
		// The fetcher is the origin: the wait is the request's, up to
		// its last byte, not the decoding in between.
		var waited time.Duration
		defer func() { r.originWait.Add(int64(waited)) }()
		waited = time.Since(t0)
		if rc != nil {
			rc = &timedBody{ReadCloser: rc, waited: &waited, bytes: &r.originBytes}
		}
	}
	if err != nil {
		return fmt.Errorf("layer %s chunk %s: fetch bytes %d-%d: %w", r.o.Layer, g[0].Digest, start, end-1, err)
	}
	defer rc.Close()
	buf := make([]byte, end-start)
	have := int64(0)
	for i, c := range g {
		if need := c.End - start; need > have {
			n, err := io.ReadFull(rc, buf[have:need])
			have += int64(n)
			r.fetchedBytes.Add(int64(n))
			if err != nil {
				return fmt.Errorf("layer %s chunk %s: fetch bytes %d-%d: %w", r.o.Layer, c.Digest, start, end-1, err)
			}
		}
		if r.has(c.Digest) {
			continue
		}
		data, err := r.decode(buf[c.Offset-start:c.End-start], c)
		if err != nil {
			return err
		}
		if v, ok := fetcherAs[Confirmer](r.fetcher); ok {
			v.Verified(c.Offset, c.End-c.Offset)
		}
		if err := r.store.Put(c.Digest, data); err != nil {
			// The bytes are verified: the readers waiting on them get them
			// even though the store (a full disk, a quota held by chunks
			// in use) cannot keep them.
			r.o.Logger.Warn("chunk not cached, served from memory", "layer", r.o.Layer, "chunk", c.Digest, "err", err)
			r.keep(c.Digest, data)
		}
		r.chunksFetched.Add(1)
		// Wake the readers of this chunk now rather than at the end of the run.
		r.finish(g[i:i+1], nil)
	}
	return nil
}

// timedBody adds the time spent in Read to waited, and the bytes to bytes.
type timedBody struct {
	io.ReadCloser
	waited *time.Duration
	bytes  *atomic.Int64
}

func (b *timedBody) Read(p []byte) (int, error) {
	t := time.Now()
	n, err := b.ReadCloser.Read(p)
	*b.waited += time.Since(t)
	b.bytes.Add(int64(n))
	return n, err
}

// decode decompresses a chunk's stream, cuts the chunk out and verifies it.
// The TOC's limits bound Inner and Size, so the work is bounded too.
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
	r.o.Logger.Warn("chunk verification failed", "layer", r.o.Layer, "chunk", c.Digest, "offset", c.Offset, "err", cause)
	return fmt.Errorf("layer %s chunk %s at %d: %w: %v", r.o.Layer, c.Digest, c.Offset, ErrVerify, cause)
}

// recoverInto turns a panic of a Reader goroutine into a logged error: a
// bug or a hostile layer must not take the daemon down with it.
func (r *Reader) recoverInto(what string) {
	if p := recover(); p != nil {
		r.o.Logger.Error("panic in layer "+what, "layer", r.o.Layer, "panic", p, "stack", string(debug.Stack()))
	}
}

// LocalFile opens a regular file's whole contents as one local file, when
// every byte of it is stored: the kernel can then serve it directly (FUSE
// passthrough). A one-chunk file is its chunk; a longer file is assembled
// once from its chunks, checked against the file's digest, and stored under
// it. ok is false when the store cannot do this or bytes are missing.
func (r *Reader) LocalFile(e *toc.Entry) (f *os.File, ok bool) {
	fs, isFS := r.store.(FileStore)
	if !isFS || e.Type != "reg" || e.Size == 0 || len(e.Chunks) == 0 {
		return nil, false
	}
	if len(e.Chunks) == 1 && e.Chunks[0].Inner == 0 && e.Chunks[0].Size == e.Size {
		return fs.OpenFile(e.Chunks[0].Digest)
	}
	if e.Digest == "" {
		return nil, false
	}
	if f, ok := fs.OpenFile(e.Digest); ok {
		return f, true
	}
	if !r.Local(e.Chunks) {
		return nil, false
	}
	// Assembling a large file takes a while: do it once, in the
	// background, and serve this open through FUSE reads meanwhile.
	r.mu.Lock()
	if r.assembling == nil {
		r.assembling = map[string]bool{}
	}
	busy := r.assembling[e.Digest] || r.ctx.Err() != nil
	r.assembling[e.Digest] = true
	r.mu.Unlock()
	if busy {
		return nil, false
	}
	r.goOwned(func() {
		defer r.recoverInto("file assembly")
		err := fs.PutFile(e.Digest, e.Size, func(w io.Writer) error {
			var buf []byte
			for _, c := range e.Chunks {
				if r.ctx.Err() != nil {
					return ErrClosed
				}
				if int64(cap(buf)) < c.Size {
					buf = make([]byte, c.Size)
				}
				b := buf[:c.Size]
				n, ok := r.store.ReadAt(c.Digest, b, 0)
				if !ok || int64(n) != c.Size {
					return fmt.Errorf("chunk %s left the store", c.Digest)
				}
				if _, err := w.Write(b); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			r.o.Logger.Debug("file not assembled for passthrough", "layer", r.o.Layer, "file", e.Name, "err", err)
		}
		r.mu.Lock()
		delete(r.assembling, e.Digest)
		r.mu.Unlock()
	})
	return nil, false
}

// waitingDemand is the number of demand reads waiting (tests).
func (r *Reader) waitingDemand() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.demand
}
