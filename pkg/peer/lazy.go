package peer

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/starling-dev/starling/pkg/registry"
)

// Fetcher reads byte ranges of one blob. It has the method set of
// blob.Fetcher, so each satisfies the other without this package knowing
// the lazy-read code.
type Fetcher interface {
	// Fetch returns length bytes of the blob from off.
	Fetch(ctx context.Context, off, length int64) (io.ReadCloser, error)
}

// ErrFetcherClosed is returned by Fetch after Close.
var ErrFetcherClosed = errors.New("peer: lazy fetcher closed")

// LazyFetcher reads ranges of one blob through the peer, so that a lazily
// mounted layer on one node leaves pieces that other nodes fetch from it.
// The task is opened on the first Fetch. When the peer cannot open it, the
// range comes from direct (the registry), so the layer works without the
// P2P network. Close releases the task, so that storage GC may collect it;
// readers still open keep it until they are closed. It is safe for
// concurrent use.
type LazyFetcher struct {
	p      *Peer
	req    Request
	direct Fetcher

	mu      sync.Mutex
	d       *Download
	opening chan struct{} // closed when an Open in progress ends
	users   int           // Fetch calls and readers not yet closed
	closed  bool
}

// NewLazyFetcher returns a Fetcher of the blob r names (TaskID, URL,
// Digest and Length should be set; for a registry blob the task ID is its
// digest). direct reads the blob without the peer; it is also the origin
// of the task when r.Source is nil, which needs r.Length.
func (p *Peer) NewLazyFetcher(r Request, direct Fetcher) *LazyFetcher {
	if r.Source == nil {
		r.Source = sizedSource{Fetcher: direct, size: r.Length}
	}
	return &LazyFetcher{p: p, req: r, direct: direct}
}

// RegistryBlobRequest names a layer blob of repo as a task. The task ID is
// the digest, so the same blob from any registry or mirror is one task.
func RegistryBlobRequest(repo name.Repository, desc v1.Descriptor) Request {
	return Request{
		TaskID: desc.Digest.String(),
		URL:    registry.BlobURL(repo, desc.Digest),
		Digest: desc.Digest.String(),
		Length: desc.Size,
	}
}

// sizedSource is a Source over a Fetcher whose blob size is known.
type sizedSource struct {
	Fetcher
	size int64
}

func (s sizedSource) Size(context.Context) (int64, error) {
	if s.size <= 0 {
		return 0, errors.New("blob size not known")
	}
	return s.size, nil
}

// Fetch returns length bytes of the blob from off.
func (f *LazyFetcher) Fetch(ctx context.Context, off, length int64) (io.ReadCloser, error) {
	d, err := f.acquire(ctx)
	if errors.Is(err, ErrFetcherClosed) || (err != nil && ctx.Err() != nil) {
		return nil, err
	}
	if err != nil {
		// The layer still works without the P2P network.
		f.p.log.Warn("layer through the peer failed, reading the registry directly", "blob", f.req.TaskID, "err", err)
		return f.direct.Fetch(ctx, off, length)
	}
	rc, err := d.Fetch(ctx, off, length)
	if err != nil {
		f.release()
		return nil, err
	}
	return &lazyReader{ReadCloser: rc, f: f}, nil
}

// acquire returns the open download, opening it first if need be, and
// counts a user. The lock is not held while the task is opened (which may
// ask the scheduler): other callers wait on f.opening, or their ctx.
func (f *LazyFetcher) acquire(ctx context.Context) (*Download, error) {
	f.mu.Lock()
	for {
		if f.closed {
			f.mu.Unlock()
			return nil, ErrFetcherClosed
		}
		if f.d != nil {
			f.users++
			d := f.d
			f.mu.Unlock()
			return d, nil
		}
		if f.opening == nil {
			break
		}
		ch := f.opening
		f.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		f.mu.Lock()
	}
	ch := make(chan struct{})
	f.opening = ch
	f.mu.Unlock()

	d, err := f.p.Open(ctx, f.req)

	f.mu.Lock()
	defer f.mu.Unlock()
	f.opening = nil
	close(ch)
	if err != nil {
		// The next Fetch tries again: the failure may pass.
		return nil, fmt.Errorf("open task %s: %w", f.req.TaskID, err)
	}
	if f.closed {
		d.Close()
		return nil, ErrFetcherClosed
	}
	f.d = d
	f.users++
	return d, nil
}

// release drops a user; the last one after Close closes the download.
func (f *LazyFetcher) release() {
	f.mu.Lock()
	f.users--
	d := f.closeLocked()
	f.mu.Unlock()
	if d != nil {
		d.Close()
	}
}

// closeLocked hands over the download to close once closed and unused.
func (f *LazyFetcher) closeLocked() *Download {
	if !f.closed || f.users > 0 || f.d == nil {
		return nil
	}
	d := f.d
	f.d = nil
	return d
}

// Close releases the task once every reader Fetch returned is closed.
// Fetch fails afterwards. Close is idempotent.
func (f *LazyFetcher) Close() error {
	f.mu.Lock()
	f.closed = true
	d := f.closeLocked()
	f.mu.Unlock()
	if d != nil {
		return d.Close()
	}
	return nil
}

// lazyReader holds its fetcher's download until closed.
type lazyReader struct {
	io.ReadCloser
	f    *LazyFetcher
	once sync.Once
}

func (r *lazyReader) Close() error {
	err := r.ReadCloser.Close()
	r.once.Do(r.f.release)
	return err
}
