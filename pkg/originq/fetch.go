package originq

import (
	"context"
	"io"
	"net/http"
	"sync"
)

// RangeFetcher reads byte ranges of one blob; it has the method set of
// blob.Fetcher and peer.Fetcher, so each satisfies the others.
type RangeFetcher interface {
	Fetch(ctx context.Context, off, length int64) (io.ReadCloser, error)
}

// Fetcher wraps f so that each Fetch holds a slot of g to host, at the
// priority of its ctx, from before the request until its body is closed
// (or the request fails). A nil g returns f.
func Fetcher(g *Gate, host string, f RangeFetcher) RangeFetcher {
	if g == nil {
		return f
	}
	return &gatedFetcher{g: g, host: host, f: f}
}

type gatedFetcher struct {
	g    *Gate
	host string
	f    RangeFetcher
}

func (gf *gatedFetcher) Fetch(ctx context.Context, off, length int64) (io.ReadCloser, error) {
	release, err := gf.g.Acquire(ctx, gf.host, PriorityFrom(ctx))
	if err != nil {
		return nil, err
	}
	rc, err := gf.f.Fetch(ctx, off, length)
	if err != nil {
		release()
		return nil, err
	}
	return &releasingBody{ReadCloser: rc, release: release}, nil
}

// Close closes the wrapped fetcher if it is an io.Closer, so that wrapping
// does not hide a fetcher's end from whoever owns it.
func (gf *gatedFetcher) Close() error {
	if c, ok := gf.f.(io.Closer); ok {
		return c.Close()
	}
	return nil
}

// Unwrap returns the wrapped fetcher.
func (gf *gatedFetcher) Unwrap() RangeFetcher { return gf.f }

// releasingBody gives the slot back when the body is closed.
type releasingBody struct {
	io.ReadCloser
	release func()
	once    sync.Once
}

func (b *releasingBody) Close() error {
	err := b.ReadCloser.Close()
	b.once.Do(b.release)
	return err
}

// Transport wraps base so that each request holds a slot of g to its URL's
// host until its response body is closed. The priority is the request
// context's when it carries one, else dflt: a peer's origin client uses
// Seed on a seed, whose origin traffic is whole blobs for the cluster.
// A nil g returns base.
func Transport(g *Gate, base http.RoundTripper, dflt Priority) http.RoundTripper {
	if g == nil {
		return base
	}
	if base == nil {
		base = http.DefaultTransport
	}
	return &gatedTransport{g: g, base: base, dflt: dflt.valid()}
}

type gatedTransport struct {
	g    *Gate
	base http.RoundTripper
	dflt Priority
}

func (t *gatedTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	ctx := req.Context()
	p, ok := priorityOf(ctx)
	if !ok {
		p = t.dflt
	}
	release, err := t.g.Acquire(ctx, req.URL.Host, p)
	if err != nil {
		if req.Body != nil {
			// RoundTrip must close the request body, even on error.
			_ = req.Body.Close()
		}
		return nil, err
	}
	resp, err := t.base.RoundTrip(req)
	if err != nil {
		release()
		return nil, err
	}
	if resp.Body == nil {
		release()
		return resp, nil
	}
	resp.Body = &releasingBody{ReadCloser: resp.Body, release: release}
	return resp, nil
}

// CloseIdleConnections passes on to base, so that http.Client's works.
func (t *gatedTransport) CloseIdleConnections() {
	type closeIdler interface{ CloseIdleConnections() }
	if c, ok := t.base.(closeIdler); ok {
		c.CloseIdleConnections()
	}
}
