package testenv

import (
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// CountingProxy is a reverse proxy in front of a registry that counts what
// the registry sends, can add latency to every request, and can be told to
// stop answering in the middle of blob bodies.
type CountingProxy struct {
	Addr string

	bytes    atomic.Int64
	requests atomic.Int64
	latency  atomic.Int64 // nanoseconds
	stall    atomic.Bool

	mu     sync.Mutex
	byBlob map[string]int64
	gets   map[string][]string // blob -> Range header of each GET ("" for none)
	hang   chan struct{}
	// auths: client IP -> Authorization value -> requests carrying it; kept
	// across Reset, so that a test sees every credential that ever arrived.
	auths map[string]map[string]int
}

// StartCountingProxy proxies to upstream (host:port) from a loopback port.
func StartCountingProxy(t testing.TB, upstream string) *CountingProxy {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return ServeCountingProxy(t, l, upstream)
}

// ServeCountingProxy serves on an existing listener (for example one opened
// inside a network namespace).
func ServeCountingProxy(t testing.TB, l net.Listener, upstream string) *CountingProxy {
	t.Helper()
	p := &CountingProxy{Addr: l.Addr().String(), byBlob: map[string]int64{}, gets: map[string][]string{}, hang: make(chan struct{}),
		auths: map[string]map[string]int{}}
	u, _ := url.Parse("http://" + upstream)
	rp := httputil.NewSingleHostReverseProxy(u)
	rp.ModifyResponse = func(resp *http.Response) error {
		blob := ""
		if i := strings.Index(resp.Request.URL.Path, "/blobs/"); i >= 0 {
			blob = resp.Request.URL.Path[i+len("/blobs/"):]
		}
		resp.Body = &countingBody{rc: resp.Body, p: p, blob: blob}
		return nil
	}
	rp.ErrorLog = log.New(io.Discard, "", 0)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p.requests.Add(1)
		if a := r.Header.Get("Authorization"); a != "" {
			host, _, _ := net.SplitHostPort(r.RemoteAddr)
			p.mu.Lock()
			if p.auths[host] == nil {
				p.auths[host] = map[string]int{}
			}
			p.auths[host][a]++
			p.mu.Unlock()
		}
		if i := strings.Index(r.URL.Path, "/blobs/"); i >= 0 && r.Method == http.MethodGet {
			p.mu.Lock()
			blob := r.URL.Path[i+len("/blobs/"):]
			p.gets[blob] = append(p.gets[blob], r.Header.Get("Range"))
			p.mu.Unlock()
		}
		if d := time.Duration(p.latency.Load()); d > 0 {
			time.Sleep(d)
		}
		rp.ServeHTTP(w, r)
	})}
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(func() {
		p.Resume()
		_ = srv.Close()
	})
	return p
}

type countingBody struct {
	rc   io.ReadCloser
	p    *CountingProxy
	blob string
}

func (b *countingBody) Read(buf []byte) (int, error) {
	if b.blob != "" && b.p.stall.Load() {
		// Hold the connection open and send nothing, like a registry that
		// stopped answering mid-transfer.
		b.p.mu.Lock()
		hang := b.p.hang
		b.p.mu.Unlock()
		<-hang
		return 0, fmt.Errorf("stalled")
	}
	n, err := b.rc.Read(buf)
	b.p.bytes.Add(int64(n))
	if b.blob != "" {
		b.p.mu.Lock()
		b.p.byBlob[b.blob] += int64(n)
		b.p.mu.Unlock()
	}
	return n, err
}

func (b *countingBody) Close() error { return b.rc.Close() }

// BytesServed is every body byte sent so far.
func (p *CountingProxy) BytesServed() int64 { return p.bytes.Load() }

// Requests is the number of requests so far.
func (p *CountingProxy) Requests() int64 { return p.requests.Load() }

// BlobBytes is the body bytes sent of one blob ("sha256:...").
func (p *CountingProxy) BlobBytes(digest string) int64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.byBlob[digest]
}

// BlobGets is the Range header of every GET of one blob ("sha256:...")
// so far, in arrival order; "" is a GET of the whole blob.
func (p *CountingProxy) BlobGets(digest string) []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.gets[digest]...)
}

// Authorizations is, per client IP, every Authorization header value the
// registry received from it and how many requests carried it, since the
// proxy started (Reset leaves it).
func (p *CountingProxy) Authorizations() map[string]map[string]int {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make(map[string]map[string]int, len(p.auths))
	for ip, m := range p.auths {
		out[ip] = make(map[string]int, len(m))
		for a, n := range m {
			out[ip][a] = n
		}
	}
	return out
}

// Reset zeroes the counters.
func (p *CountingProxy) Reset() {
	p.bytes.Store(0)
	p.requests.Store(0)
	p.mu.Lock()
	p.byBlob = map[string]int64{}
	p.gets = map[string][]string{}
	p.mu.Unlock()
}

// SetLatency adds d before every request is forwarded.
func (p *CountingProxy) SetLatency(d time.Duration) { p.latency.Store(int64(d)) }

// Stall makes blob bodies stop mid-transfer until Resume.
func (p *CountingProxy) Stall() { p.stall.Store(true) }

// Resume undoes Stall and releases the bodies held.
func (p *CountingProxy) Resume() {
	if p.stall.Swap(false) {
		p.mu.Lock()
		close(p.hang)
		p.hang = make(chan struct{})
		p.mu.Unlock()
	}
}
