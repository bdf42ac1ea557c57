package registry

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"sync"
	"syscall"
	"time"
)

// baseTransport is the innermost round tripper, under go-containerregistry's
// auth and containerd's: it picks TLS settings per host, keeps plain HTTP to
// the hosts that allow it, bounds every request in time and retries what is
// worth retrying. go-containerregistry's own retry does not honour
// Retry-After, which registries behind rate limits send, so retries are done
// here instead.
type baseTransport struct {
	cfg     Config
	secure  http.RoundTripper
	skipTLS http.RoundTripper
}

// NewTransport returns the transport that reaches registries as cfg says:
// TLS per host (Config.Endpoint), plain HTTP only where allowed, deadlines
// on response headers and on stalled bodies, and retries that honour
// Retry-After. Client uses it under go-containerregistry's auth; give it to
// other registry clients (containerd's resolver) so they behave the same.
func NewTransport(cfg Config) http.RoundTripper { return newBaseTransport(cfg.withDefaults()) }

func newBaseTransport(cfg Config) *baseTransport {
	mk := func(e Endpoint) *http.Transport {
		d := &net.Dialer{Timeout: cfg.DialTimeout, KeepAlive: 30 * time.Second}
		return &http.Transport{
			Proxy:                 http.ProxyFromEnvironment,
			DialContext:           d.DialContext,
			TLSHandshakeTimeout:   cfg.DialTimeout,
			ResponseHeaderTimeout: cfg.RequestTimeout,
			ExpectContinueTimeout: time.Second,
			MaxIdleConns:          256,
			MaxIdleConnsPerHost:   64,
			IdleConnTimeout:       90 * time.Second,
			ForceAttemptHTTP2:     true,
			TLSClientConfig:       e.TLSConfig(),
		}
	}
	return &baseTransport{cfg: cfg, secure: mk(Endpoint{}), skipTLS: mk(Endpoint{SkipVerify: true})}
}

func (t *baseTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	e := t.cfg.Endpoint(req.URL.Host)
	if req.URL.Scheme == "http" && !e.PlainHTTP {
		// go-containerregistry falls back to plain HTTP for private-range
		// addresses; starling only does so where the user said so.
		r2 := req.Clone(req.Context())
		r2.URL.Scheme = "https"
		req = r2
	}
	rt := t.secure
	if e.SkipVerify {
		rt = t.skipTLS
	}
	return t.retry(rt, req)
}

func retryable(code int) bool {
	return code == http.StatusTooManyRequests || code == http.StatusBadGateway ||
		code == http.StatusServiceUnavailable || code == http.StatusGatewayTimeout ||
		code == http.StatusInternalServerError
}

func (t *baseTransport) retry(rt http.RoundTripper, req *http.Request) (*http.Response, error) {
	canReplay := req.Body == nil || req.Body == http.NoBody || req.GetBody != nil
	var lastErr error
	for attempt := 0; ; attempt++ {
		r := req
		if attempt > 0 && req.GetBody != nil {
			body, err := req.GetBody()
			if err != nil {
				return nil, err
			}
			r = req.Clone(req.Context())
			r.Body = body
		}
		resp, err := t.once(rt, r)
		last := attempt >= t.cfg.Retries || !canReplay
		if err == nil && !retryable(resp.StatusCode) {
			return resp, nil
		}
		if err != nil && (errors.Is(err, context.Canceled) || req.Context().Err() != nil || !retryableErr(err)) {
			return nil, err
		}
		if last {
			if err != nil {
				if lastErr != nil && errors.Is(err, context.DeadlineExceeded) {
					err = lastErr
				}
				return nil, err
			}
			return resp, nil
		}
		wait := backoff(attempt, t.cfg.MaxRetryWait)
		if err == nil {
			if ra, ok := retryAfter(resp.Header.Get("Retry-After"), t.cfg.MaxRetryWait); ok {
				wait = ra
			}
			_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
			resp.Body.Close()
			lastErr = fmt.Errorf("%s %s: %s", req.Method, req.URL.Redacted(), resp.Status)
		} else {
			lastErr = err
		}
		if err := sleep(req.Context(), wait); err != nil {
			return nil, err
		}
	}
}

// retryableErr reports errors worth another try: the connection failed or
// broke. A TLS or certificate error will fail the same way again (and
// go-containerregistry's https-then-http probe of insecure registries must
// not wait for retries).
func retryableErr(err error) bool {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return true
	}
	return errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ECONNRESET) ||
		errors.Is(err, syscall.EPIPE) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF)
}

// once sends one request and bounds its body: a body that stalls longer than
// the request timeout is cut, so a registry that stops answering mid-read
// gives an error instead of a hung reader.
func (t *baseTransport) once(rt http.RoundTripper, req *http.Request) (*http.Response, error) {
	ctx, cancel := context.WithCancel(req.Context())
	resp, err := rt.RoundTrip(req.WithContext(ctx))
	if err != nil {
		cancel()
		return nil, err
	}
	resp.Body = newStallBody(resp.Body, t.cfg.RequestTimeout, cancel)
	return resp, nil
}

// sleep waits between tries; tests replace it to see the waits chosen.
var sleep = func(ctx context.Context, d time.Duration) error {
	select {
	case <-time.After(d):
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func backoff(attempt int, max time.Duration) time.Duration {
	d := 200 * time.Millisecond << attempt
	d += time.Duration(rand.Int64N(int64(d)/4 + 1))
	if d > max {
		d = max
	}
	return d
}

// retryAfter parses a Retry-After header: delta seconds or an HTTP date.
func retryAfter(v string, max time.Duration) (time.Duration, bool) {
	if v == "" {
		return 0, false
	}
	var d time.Duration
	if s, err := strconv.Atoi(v); err == nil {
		d = time.Duration(s) * time.Second
	} else if at, err := http.ParseTime(v); err == nil {
		d = time.Until(at)
	} else {
		return 0, false
	}
	if d < 0 {
		d = 0
	}
	if d > max {
		d = max
	}
	return d, true
}

// stallBody cancels its request when no read completes within timeout.
type stallBody struct {
	rc      io.ReadCloser
	timeout time.Duration
	cancel  context.CancelFunc
	mu      sync.Mutex
	timer   *time.Timer
	stalled bool
}

func newStallBody(rc io.ReadCloser, timeout time.Duration, cancel context.CancelFunc) *stallBody {
	b := &stallBody{rc: rc, timeout: timeout, cancel: cancel}
	b.timer = time.AfterFunc(timeout, func() {
		b.mu.Lock()
		b.stalled = true
		b.mu.Unlock()
		cancel()
	})
	return b
}

func (b *stallBody) Read(p []byte) (int, error) {
	n, err := b.rc.Read(p)
	b.timer.Reset(b.timeout)
	if err != nil && err != io.EOF {
		b.mu.Lock()
		stalled := b.stalled
		b.mu.Unlock()
		if stalled {
			err = fmt.Errorf("no data for %s: %w", b.timeout, ErrStalled)
		}
	}
	return n, err
}

func (b *stallBody) Close() error {
	b.timer.Stop()
	err := b.rc.Close()
	b.cancel()
	return err
}

// ErrStalled is returned by a read of a body that stopped arriving.
var ErrStalled = errors.New("registry stopped sending")

// headerTransport adds an endpoint's headers, and for a mirror containerd's
// ns query parameter naming the origin, to every request it sends.
type headerTransport struct {
	inner  http.RoundTripper
	host   string
	header http.Header
	ns     string
}

func (t *headerTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.URL.Host != t.host || (len(t.header) == 0 && t.ns == "") {
		return t.inner.RoundTrip(req)
	}
	r := req.Clone(req.Context())
	for k, vs := range t.header {
		r.Header.Del(k)
		for _, v := range vs {
			r.Header.Add(k, v)
		}
	}
	if t.ns != "" {
		q := r.URL.Query()
		if q.Get("ns") == "" {
			q.Set("ns", t.ns)
			r.URL.RawQuery = q.Encode()
		}
	}
	return t.inner.RoundTrip(r)
}
