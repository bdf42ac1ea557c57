package registry

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// fakeBlobServer answers the distribution API for one blob, with hooks to
// script its behaviour. It is the far side of the protocol for cases a real
// registry cannot be made to produce (429s, redirects, token challenges).
type fakeBlobServer struct {
	blob     []byte
	digest   v1.Hash
	handle   func(w http.ResponseWriter, r *http.Request) bool // true: handled
	requests atomic.Int64
	mu       sync.Mutex
	seen     []*http.Request
}

func newFake(t *testing.T, blob []byte) (*fakeBlobServer, *httptest.Server) {
	h, _, _ := v1.SHA256(strings.NewReader(string(blob)))
	f := &fakeBlobServer{blob: blob, digest: h}
	srv := httptest.NewServer(f)
	t.Cleanup(srv.Close)
	return f, srv
}

func (f *fakeBlobServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.requests.Add(1)
	f.mu.Lock()
	f.seen = append(f.seen, r.Clone(context.Background()))
	f.mu.Unlock()
	if f.handle != nil && f.handle(w, r) {
		return
	}
	if r.URL.Path == "/v2/" {
		w.WriteHeader(http.StatusOK)
		return
	}
	if strings.HasSuffix(r.URL.Path, "/blobs/"+f.digest.String()) {
		http.ServeContent(w, r, "", time.Time{}, strings.NewReader(string(f.blob)))
		return
	}
	http.NotFound(w, r)
}

func host(srv *httptest.Server) string { u, _ := url.Parse(srv.URL); return u.Host }

func anonClient(cfg Config, opts ...Option) *Client {
	return New(cfg, append([]Option{WithKeychain(authn.NewMultiKeychain())}, opts...)...)
}

func TestBlobRangeAndSize(t *testing.T) {
	f, srv := newFake(t, []byte("0123456789abcdef"))
	c := anonClient(DefaultConfig())
	repo, err := c.ParseRepository(host(srv) + "/lib/x")
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	rc, err := c.BlobRange(ctx, repo, f.digest, 4, 6)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(rc)
	rc.Close()
	if string(b) != "456789" {
		t.Fatalf("range read %q", b)
	}
	buf := make([]byte, 3)
	ra := c.NewBlobReaderAt(ctx, repo, f.digest)
	if _, err := ra.ReadAt(buf, 13); err != nil || string(buf) != "def" {
		t.Fatalf("ReadAt %q %v", buf, err)
	}
	// A registry that answers a range over the end with what there is:
	// the bytes and io.EOF, as io.ReaderAt says.
	buf = make([]byte, 8)
	if n, err := ra.ReadAt(buf, 12); n != 4 || err != io.EOF || string(buf[:n]) != "cdef" {
		t.Fatalf("ReadAt over the end: %q %v", buf[:n], err)
	}
	n, err := c.BlobSize(ctx, repo, f.digest)
	if err != nil || n != 16 {
		t.Fatalf("size %d %v", n, err)
	}
}

func TestRangeIgnoredIsAnError(t *testing.T) {
	f, srv := newFake(t, []byte("0123456789"))
	f.handle = func(w http.ResponseWriter, r *http.Request) bool {
		if strings.Contains(r.URL.Path, "/blobs/") {
			_, _ = w.Write(f.blob) // 200 with everything
			return true
		}
		return false
	}
	c := anonClient(DefaultConfig())
	repo, _ := c.ParseRepository(host(srv) + "/x")
	_, err := c.BlobRange(context.Background(), repo, f.digest, 2, 2)
	if !errors.Is(err, ErrRangeUnsupported) {
		t.Fatalf("want ErrRangeUnsupported, got %v", err)
	}
}

func TestRetryHonoursRetryAfter(t *testing.T) {
	f, srv := newFake(t, []byte("payload"))
	var fails atomic.Int64
	f.handle = func(w http.ResponseWriter, r *http.Request) bool {
		if !strings.Contains(r.URL.Path, "/blobs/") {
			return false
		}
		if fails.Add(1) == 1 {
			w.Header().Set("Retry-After", "7")
			w.WriteHeader(http.StatusTooManyRequests)
			return true
		}
		return false
	}
	var waits []time.Duration
	sleep = func(_ context.Context, d time.Duration) error { waits = append(waits, d); return nil }
	defer func() { sleep = realSleep }()
	c := anonClient(DefaultConfig())
	repo, _ := c.ParseRepository(host(srv) + "/x")
	rc, err := c.OpenBlob(context.Background(), repo, f.digest)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(rc)
	rc.Close()
	if string(b) != "payload" || fails.Load() != 2 {
		t.Fatalf("got %q after %d tries", b, fails.Load())
	}
	if len(waits) != 1 || waits[0] != 7*time.Second {
		t.Fatalf("waited %v, Retry-After said 7s", waits)
	}
}

var realSleep = sleep

func TestRetryGivesUp(t *testing.T) {
	f, srv := newFake(t, nil)
	f.handle = func(w http.ResponseWriter, r *http.Request) bool {
		if strings.Contains(r.URL.Path, "/blobs/") {
			w.WriteHeader(http.StatusServiceUnavailable)
			return true
		}
		return false
	}
	cfg := DefaultConfig()
	cfg.Retries = 2
	cfg.MaxRetryWait = 10 * time.Millisecond
	c := anonClient(cfg)
	repo, _ := c.ParseRepository(host(srv) + "/x")
	_, err := c.OpenBlob(context.Background(), repo, f.digest)
	if err == nil || !strings.Contains(err.Error(), "503") {
		t.Fatalf("want a 503 error, got %v", err)
	}
	var got int
	f.mu.Lock()
	for _, r := range f.seen {
		if strings.Contains(r.URL.Path, "/blobs/") {
			got++
		}
	}
	f.mu.Unlock()
	if got != 3 {
		t.Fatalf("%d blob requests, want 1 + 2 retries", got)
	}
}

func TestBearerTokenAndReauth(t *testing.T) {
	var tokens atomic.Int64
	f, srv := newFake(t, []byte("secret blob"))
	var realm string
	f.handle = func(w http.ResponseWriter, r *http.Request) bool {
		if r.URL.Path == "/token" {
			u, p, ok := r.BasicAuth()
			if !ok || u != "alice" || p != "pw" {
				w.WriteHeader(http.StatusUnauthorized)
				return true
			}
			n := tokens.Add(1)
			_ = json.NewEncoder(w).Encode(map[string]string{"token": fmt.Sprintf("tok%d", n)})
			return true
		}
		// The second token is the only valid one from the blob's point of
		// view once the first expired: the client must re-authenticate.
		want := fmt.Sprintf("Bearer tok%d", tokens.Load())
		if r.Header.Get("Authorization") != want || (strings.Contains(r.URL.Path, "/blobs/") && tokens.Load() < 2) {
			w.Header().Set("WWW-Authenticate", fmt.Sprintf(`Bearer realm=%q,service="fake",scope="repository:x:pull"`, realm))
			w.WriteHeader(http.StatusUnauthorized)
			return true
		}
		return false
	}
	realm = srv.URL + "/token"
	kc := staticKeychain{authn.FromConfig(authn.AuthConfig{Username: "alice", Password: "pw"})}
	c := New(DefaultConfig(), WithKeychain(kc))
	repo, _ := c.ParseRepository(host(srv) + "/x")
	rc, err := c.OpenBlob(context.Background(), repo, f.digest)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(rc)
	rc.Close()
	if string(b) != "secret blob" || tokens.Load() < 2 {
		t.Fatalf("got %q with %d tokens", b, tokens.Load())
	}
}

type staticKeychain struct{ a authn.Authenticator }

func (k staticKeychain) Resolve(authn.Resource) (authn.Authenticator, error) { return k.a, nil }

func TestRedirectDoesNotLeakAuthorization(t *testing.T) {
	// The blob lives on another host (think S3); it must not see the
	// registry's credentials.
	var leaked atomic.Value
	storage := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		leaked.Store(r.Header.Get("Authorization"))
		_, _ = w.Write([]byte("from storage"))
	}))
	defer storage.Close()
	f, srv := newFake(t, []byte("from storage"))
	f.handle = func(w http.ResponseWriter, r *http.Request) bool {
		if r.URL.Path == "/v2/" {
			if r.Header.Get("Authorization") == "" {
				w.Header().Set("WWW-Authenticate", `Basic realm="fake"`)
				w.WriteHeader(http.StatusUnauthorized)
				return true
			}
			return false
		}
		if strings.Contains(r.URL.Path, "/blobs/") {
			if r.Header.Get("Authorization") == "" {
				w.WriteHeader(http.StatusUnauthorized)
				return true
			}
			// Docker registries redirect blobs to storage; the storage host
			// here is 127.0.0.1 under another port, spelled as localhost so
			// that it is a different host name.
			http.Redirect(w, r, strings.Replace(storage.URL, "127.0.0.1", "localhost", 1)+"/blob", http.StatusTemporaryRedirect)
			return true
		}
		return false
	}
	kc := staticKeychain{authn.FromConfig(authn.AuthConfig{Username: "bob", Password: "pw"})}
	c := New(DefaultConfig(), WithKeychain(kc))
	repo, _ := c.ParseRepository(host(srv) + "/x")
	rc, err := c.OpenBlob(context.Background(), repo, f.digest)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(rc)
	rc.Close()
	if string(b) != "from storage" {
		t.Fatalf("got %q", b)
	}
	if v, _ := leaked.Load().(string); v != "" {
		t.Fatalf("storage host received Authorization %q", v)
	}
	// The registry itself did get basic auth.
	f.mu.Lock()
	defer f.mu.Unlock()
	var sawAuth bool
	for _, r := range f.seen {
		if strings.Contains(r.URL.Path, "/blobs/") && r.Header.Get("Authorization") == "Basic "+base64.StdEncoding.EncodeToString([]byte("bob:pw")) {
			sawAuth = true
		}
	}
	if !sawAuth {
		t.Fatal("registry never saw the basic credentials")
	}
}

func TestMirrorFirstWithHeadersThenOrigin(t *testing.T) {
	fo, origin := newFake(t, []byte("blob bytes"))
	fm, mirror := newFake(t, []byte("blob bytes"))
	cfg := DefaultConfig()
	cfg.Host = map[string]HostConfig{
		host(origin): {Mirrors: []Mirror{{
			Host:   host(mirror),
			Header: http.Header{"X-Dragonfly-Registry": {"http://" + host(origin)}},
		}}},
	}
	c := anonClient(cfg)
	repo, _ := c.ParseRepository(host(origin) + "/lib/x")
	rc, err := c.BlobRange(context.Background(), repo, fo.digest, 0, 4)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(rc)
	rc.Close()
	if string(b) != "blob" {
		t.Fatalf("got %q", b)
	}
	fm.mu.Lock()
	var got *http.Request
	for _, r := range fm.seen {
		if strings.Contains(r.URL.Path, "/blobs/") {
			got = r
		}
	}
	fm.mu.Unlock()
	if got == nil {
		t.Fatal("mirror was not asked")
	}
	if got.Header.Get("X-Dragonfly-Registry") != "http://"+host(origin) || got.URL.Query().Get("ns") != host(origin) {
		t.Fatalf("mirror request lacks header or ns: %v %v", got.Header, got.URL)
	}
	if fo.requests.Load() != 0 {
		t.Fatalf("origin was asked %d times while the mirror answered", fo.requests.Load())
	}

	// A dead mirror falls through to the origin.
	mirror.Close()
	c = anonClient(cfg)
	rc, err = c.BlobRange(context.Background(), repo, fo.digest, 5, -1)
	if err != nil {
		t.Fatal(err)
	}
	b, _ = io.ReadAll(rc)
	rc.Close()
	if string(b) != "bytes" || fo.requests.Load() == 0 {
		t.Fatalf("fallback got %q, origin asked %d times", b, fo.requests.Load())
	}
}

func TestStalledBodyIsCut(t *testing.T) {
	release := make(chan struct{})
	defer close(release)
	f, srv := newFake(t, nil)
	f.handle = func(w http.ResponseWriter, r *http.Request) bool {
		if strings.Contains(r.URL.Path, "/blobs/") {
			w.Header().Set("Content-Length", "1000")
			w.WriteHeader(http.StatusOK)
			_, _ = w.Write([]byte("first bytes"))
			w.(http.Flusher).Flush()
			<-release // then nothing more
			return true
		}
		return false
	}
	cfg := DefaultConfig()
	cfg.RequestTimeout = 300 * time.Millisecond
	c := anonClient(cfg)
	repo, _ := c.ParseRepository(host(srv) + "/x")
	rc, err := c.OpenBlob(context.Background(), repo, f.digest)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	_, err = io.ReadAll(rc)
	if !errors.Is(err, ErrStalled) {
		t.Fatalf("want ErrStalled, got %v", err)
	}
}

func TestPlainHTTPRules(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Host = map[string]HostConfig{"reg.internal:5000": {Insecure: true}}
	c := anonClient(cfg)
	for h, want := range map[string]bool{
		"localhost:5000":    true,
		"127.0.0.1:5000":    true,
		"[::1]:5000":        true,
		"reg.internal:5000": true,
		"10.0.0.5:5000":     false, // private, but not configured
		"docker.io":         false,
	} {
		if got := c.plainHTTPAllowed(h); got != want {
			t.Errorf("plainHTTPAllowed(%s) = %v, want %v", h, got, want)
		}
	}
	if !anonClient(DefaultConfig(), WithPlainHTTP(true)).plainHTTPAllowed("10.0.0.5:5000") {
		t.Error("--plain-http must allow every host")
	}
	ref, err := c.ParseReference("10.0.0.5:5000/app:1")
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := ref.(name.Tag); !ok {
		t.Fatalf("parsed %T", ref)
	}
}

func TestRetryAfterParsing(t *testing.T) {
	if d, ok := retryAfter("3", time.Minute); !ok || d != 3*time.Second {
		t.Fatalf("seconds: %v %v", d, ok)
	}
	if d, ok := retryAfter("600", time.Minute); !ok || d != time.Minute {
		t.Fatalf("cap: %v %v", d, ok)
	}
	date := time.Now().Add(2 * time.Second).UTC().Format(http.TimeFormat)
	if d, ok := retryAfter(date, time.Minute); !ok || d <= 0 || d > 3*time.Second {
		t.Fatalf("date: %v %v", d, ok)
	}
	if _, ok := retryAfter("soon", time.Minute); ok {
		t.Fatal("garbage accepted")
	}
}
