package proxy

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"

	"github.com/starling-dev/starling/pkg/peer"
	"github.com/starling-dev/starling/pkg/scheduler"
)

// fakeRegistry serves blobs by repository and digest (ranges too). A
// private repository wants "Bearer <repo>" and answers 401 with a
// WWW-Authenticate otherwise; a public one serves anyone.
type fakeRegistry struct {
	srv     *httptest.Server
	private map[string]bool
	mu      sync.Mutex
	blobs   map[string][]byte // repo + "@" + digest
	heads   atomic.Int32
	gets    atomic.Int32
	down    atomic.Bool // HEADs fail with 503
}

func newFakeRegistry(t *testing.T) *fakeRegistry {
	f := &fakeRegistry{private: map[string]bool{}, blobs: map[string][]byte{}}
	f.srv = httptest.NewServer(http.HandlerFunc(f.serve))
	t.Cleanup(f.srv.Close)
	return f
}

func (f *fakeRegistry) host() string { return strings.TrimPrefix(f.srv.URL, "http://") }

// put stores data as repo's blob under digest (its own, unless given).
func (f *fakeRegistry) put(repo string, data []byte, digest string) string {
	if digest == "" {
		sum := sha256.Sum256(data)
		digest = "sha256:" + hex.EncodeToString(sum[:])
	}
	f.mu.Lock()
	f.blobs[repo+"@"+digest] = data
	f.mu.Unlock()
	return digest
}

func (f *fakeRegistry) serve(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodHead {
		f.heads.Add(1)
		if f.down.Load() {
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
	} else {
		f.gets.Add(1)
	}
	p := strings.TrimPrefix(r.URL.Path, "/v2/")
	i := strings.Index(p, "/blobs/")
	if i < 0 {
		http.NotFound(w, r)
		return
	}
	repo, digest := p[:i], p[i+len("/blobs/"):]
	if f.private[repo] && r.Header.Get("Authorization") != "Bearer "+repo {
		w.Header().Set("WWW-Authenticate", `Bearer realm="https://auth.example/token",scope="repository:`+repo+`:pull"`)
		w.WriteHeader(http.StatusUnauthorized)
		return
	}
	f.mu.Lock()
	data, ok := f.blobs[repo+"@"+digest]
	f.mu.Unlock()
	if !ok {
		http.NotFound(w, r)
		return
	}
	http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(data))
}

// attackEnv is a standalone peer and the proxy under test, without the
// docker registry newEnv starts.
func newAttackEnv(t *testing.T, o Options) *env {
	t.Helper()
	log := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	p, err := peer.New(peer.Options{Root: t.TempDir(), PieceSize: 64 << 10, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	o.Logger = log
	e := &env{t: t, peer: p}
	if e.x, err = New(o, p); err != nil {
		t.Fatal(err)
	}
	e.srv = httptest.NewServer(e.x)
	t.Cleanup(e.srv.Close)
	return e
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// Every open-proxy form of issue 11 finding 6 is refused with a 403 and a
// one-line body, and nothing reaches the internal service.
func TestOpenProxyRefused(t *testing.T) {
	var hits atomic.Int32
	internalSrv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		_, _ = w.Write([]byte("internal secret"))
	}))
	defer internalSrv.Close()
	internalHost := strings.TrimPrefix(internalSrv.URL, "http://")
	reg := newFakeRegistry(t)
	data := randomBytes(100 << 10)
	dg := reg.put("lib/x", data, "")

	// The public registry is allowed by a wildcard: its host pattern does
	// not admit loopback. The default registry is allowed, not loopback.
	e := newAttackEnv(t, Options{Allowed: []string{"*.example.com", "*"}, Connect: "allowed"})
	blob := "/v2/lib/x/blobs/" + dg
	pu, _ := url.Parse(e.srv.URL)
	proxyClient := &http.Client{Transport: &http.Transport{Proxy: http.ProxyURL(pu)}}

	check := func(what string, resp *http.Response, err error) {
		t.Helper()
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusForbidden || bytes.Count(b, []byte("\n")) != 1 || bytes.Contains(b, []byte("secret")) {
			t.Errorf("%s: %d %q, want 403 and one line", what, resp.StatusCode, b)
		}
	}
	resp, err := proxyClient.Get(internalSrv.URL + "/latest/meta-data/")
	check("absolute URI to loopback", resp, err)
	resp, err = proxyClient.Get("http://169.254.169.254/latest/meta-data/")
	check("absolute URI to the metadata address", resp, err)
	resp, err = proxyClient.Get("http://metadata.google.internal/computeMetadata/v1/")
	check("absolute URI to the metadata name", resp, err)
	resp, err = proxyClient.Get("http://localhost:1/")
	check("absolute URI to localhost", resp, err)
	for _, h := range []string{internalSrv.URL, reg.srv.URL, "http://169.254.169.254", "http://[::1]:80", "http://[fe80::1]", "http://0.0.0.0:80", "http://[::ffff:127.0.0.1]"} {
		resp, err := doReq(e.srv.URL+blob, map[string]string{HeaderRegistry: h})
		check("X-Dragonfly-Registry "+h, resp, err)
		resp, err = doReq(e.srv.URL+blob, map[string]string{HeaderRegistry: h, HeaderUseP2P: "true"})
		check("X-Dragonfly-Use-P2P with X-Dragonfly-Registry "+h, resp, err)
	}
	for _, ns := range []string{internalHost, "127.0.0.1", "localhost", "169.254.169.254", "metadata.google.internal", "registry.example.com:5000"} {
		resp, err := doReq(e.srv.URL+blob+"?ns="+ns, nil)
		check("?ns="+ns, resp, err)
	}
	// CONNECT: only port 443, only allowed hosts, never loopback.
	for _, target := range []string{internalHost, "127.0.0.1:443", "localhost:443", "169.254.169.254:443", "registry.example.com:22"} {
		if out := connect(t, pu.Host, target); !strings.HasPrefix(out, "HTTP/1.1 403") || strings.Contains(out, "secret") {
			t.Errorf("CONNECT %s answered:\n%s", target, out)
		}
	}
	if n := hits.Load(); n != 0 {
		t.Errorf("the internal service was reached %d times", n)
	}
	if n := reg.gets.Load() + reg.heads.Load(); n != 0 {
		t.Errorf("a registry on loopback matched only by a wildcard was reached %d times", n)
	}
	if got := counterValue(e.x.m.refused); got < 20 {
		t.Errorf("refused counter %v", got)
	}

	// CONNECT off (the default).
	off := newAttackEnv(t, Options{Allowed: []string{"*"}})
	offURL, _ := url.Parse(off.srv.URL)
	if out := connect(t, offURL.Host, "registry.example.com:443"); !strings.HasPrefix(out, "HTTP/1.1 403") {
		t.Errorf("CONNECT with connect off answered:\n%s", out)
	}

	// The same registry, named exactly, is served.
	ok := newAttackEnv(t, Options{Allowed: []string{reg.host()}})
	resp, err = doReq(ok.srv.URL+blob, map[string]string{HeaderRegistry: reg.srv.URL})
	if err != nil {
		t.Fatal(err)
	}
	if b, _ := io.ReadAll(resp.Body); resp.StatusCode != 200 || !bytes.Equal(b, data) {
		t.Fatalf("allowed registry: %d, %d bytes", resp.StatusCode, len(b))
	}
	resp.Body.Close()
}

func doReq(u string, hdr map[string]string) (*http.Response, error) {
	req, err := http.NewRequest(http.MethodGet, u, nil)
	if err != nil {
		return nil, err
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	return http.DefaultClient.Do(req)
}

// Issue 11 finding 5: after an authorised client pulled a private blob, a
// client without a token, with a wrong one, or with one for another
// repository gets the origin's refusal, never the cached bytes. A public
// repository costs one HEAD per TTL, whoever asks.
func TestPrivateBlobNotServedWithoutAccess(t *testing.T) {
	reg := newFakeRegistry(t)
	reg.private["team/private"] = true
	reg.private["other/private"] = true
	data := randomBytes(300 << 10)
	dg := reg.put("team/private", data, "")
	reg.put("other/private", data, dg)
	reg.put("lib/public", data, dg)
	e := newAttackEnv(t, Options{Allowed: []string{reg.host()}, DefaultRegistry: reg.srv.URL})

	get := func(repo, token, rng string) (int, []byte, http.Header) {
		t.Helper()
		hdr := map[string]string{}
		if token != "" {
			hdr["Authorization"] = "Bearer " + token
		}
		if rng != "" {
			hdr["Range"] = rng
		}
		resp, err := doReq(e.srv.URL+"/v2/"+repo+"/blobs/"+dg, hdr)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, b, resp.Header
	}
	if code, b, _ := get("team/private", "team/private", ""); code != 200 || !bytes.Equal(b, data) {
		t.Fatalf("authorised pull: %d, %d bytes", code, len(b))
	}
	for _, c := range []struct{ repo, token, rng string }{
		{"team/private", "", ""},
		{"team/private", "", "bytes=0-99"},
		{"team/private", "wrong", ""},
		{"team/private", "other/private", "bytes=100-"},
		{"other/private", "team/private", ""},
	} {
		code, b, h := get(c.repo, c.token, c.rng)
		if code != http.StatusUnauthorized || bytes.Contains(b, data[:64]) || h.Get("WWW-Authenticate") == "" {
			t.Errorf("%s with token %q range %q: %d, %d bytes, WWW-Authenticate %q; want the origin's 401",
				c.repo, c.token, c.rng, code, len(b), h.Get("WWW-Authenticate"))
		}
	}
	// The authorised client again: from the cache, no new HEAD.
	heads := reg.heads.Load()
	if code, b, _ := get("team/private", "team/private", "bytes=10-19"); code != http.StatusPartialContent || !bytes.Equal(b, data[10:20]) {
		t.Fatalf("authorised range: %d %q", code, b)
	}
	if reg.heads.Load() != heads {
		t.Errorf("a checked token was checked again within the TTL")
	}

	// A public repository: one anonymous HEAD for everyone.
	heads = reg.heads.Load()
	for i := range 5 {
		token := ""
		if i%2 == 1 {
			token = "anything"
		}
		if code, b, _ := get("lib/public", token, "bytes=0-9"); code != http.StatusPartialContent || !bytes.Equal(b, data[:10]) {
			t.Fatalf("public pull: %d %q", code, b)
		}
	}
	if n := reg.heads.Load() - heads; n > 2 {
		t.Errorf("%d HEADs for 5 pulls of a public repository, want at most 2 (one anonymous, one with the token)", n)
	}
}

// Issue 11 finding 7: bytes an attacker's upstream serves under a digest
// (named by X-Dragonfly-Registry) never reach a victim's Range request
// for that digest from its own registry.
func TestPoisonedRangeNeverServed(t *testing.T) {
	good := newFakeRegistry(t)
	evil := newFakeRegistry(t)
	data := randomBytes(512 << 10)
	dg := good.put("lib/app", data, "")
	poison := bytes.Repeat([]byte("EVIL"), len(data)/4)
	evil.put("lib/app", poison, dg)
	e := newAttackEnv(t, Options{Allowed: []string{"127.0.0.1:*"}, DefaultRegistry: good.srv.URL})
	path := e.srv.URL + "/v2/lib/app/blobs/" + dg

	// The attacker fills the node's storage from its upstream, by ranges
	// (never whole: the whole-blob check would cut it off).
	for _, rng := range []string{"bytes=0-1023", "bytes=200000-300000"} {
		resp, err := doReq(path, map[string]string{HeaderRegistry: evil.srv.URL, "Range": rng})
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	if evil.gets.Load() == 0 {
		t.Fatal("the attacker's upstream was never asked: the test proves nothing")
	}
	// The victim's ranges, from its own registry (the default, by ns, by
	// header) are the real bytes.
	for _, hdr := range []map[string]string{nil, {HeaderRegistry: good.srv.URL}} {
		for _, c := range []struct {
			rng      string
			off, end int
		}{{"bytes=0-1023", 0, 1024}, {"bytes=200000-300000", 200000, 300001}} {
			h := map[string]string{"Range": c.rng}
			for k, v := range hdr {
				h[k] = v
			}
			resp, err := doReq(path, h)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusPartialContent || !bytes.Equal(b, data[c.off:c.end]) {
				t.Errorf("victim's range %s (%v): %d, poisoned %v", c.rng, hdr, resp.StatusCode, bytes.Contains(b, []byte("EVIL")))
			}
		}
	}
}

// Answers expire: a public repository is asked again after the TTL, and an
// origin that cannot answer the question gets the client a 502, never the
// cached bytes.
func TestAuthCheckExpiresAndFailsClosed(t *testing.T) {
	reg := newFakeRegistry(t)
	data := randomBytes(100 << 10)
	dg := reg.put("lib/x", data, "")
	e := newAttackEnv(t, Options{Allowed: []string{reg.host()}, DefaultRegistry: reg.srv.URL})
	var now atomic.Int64
	now.Store(time.Now().UnixNano())
	e.x.auth.now = func() time.Time { return time.Unix(0, now.Load()) }
	get := func() (int, []byte) {
		resp, err := doReq(e.srv.URL+"/v2/lib/x/blobs/"+dg, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, b
	}
	if code, b := get(); code != 200 || !bytes.Equal(b, data) {
		t.Fatalf("first pull: %d", code)
	}
	reg.down.Store(true)
	if code, _ := get(); code != 200 || reg.heads.Load() != 1 {
		t.Fatalf("within the TTL: %d, %d HEADs; want 200 from the cache, 1 HEAD", code, reg.heads.Load())
	}
	now.Add(int64(61 * time.Second))
	if code, b := get(); code != http.StatusBadGateway || bytes.Contains(b, data[:32]) || reg.heads.Load() != 2 {
		t.Fatalf("after the TTL with the origin down: %d, %d HEADs; want 502 and a second HEAD", code, reg.heads.Load())
	}
	reg.down.Store(false)
	if code, _ := get(); code != 200 || reg.heads.Load() != 3 {
		t.Fatalf("origin back: %d, %d HEADs", code, reg.heads.Load())
	}
}

// Issue 11 finding 2: a client's registry token, sent to the proxy, never
// reaches the scheduler (any RPC), so no seed, real or fake, is handed it.
func TestCredentialsNeverInWork(t *testing.T) {
	reg := newFakeRegistry(t)
	reg.private["team/private"] = true
	data := randomBytes(200 << 10)
	dg := reg.put("team/private", data, "")

	s := scheduler.New(scheduler.Options{StartGrace: -1})
	srv, err := scheduler.NewServer(s, scheduler.ServerOptions{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var seen []string
	g := grpc.NewServer(grpc.UnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		mu.Lock()
		seen = append(seen, info.FullMethod+" "+fmt.Sprint(req))
		mu.Unlock()
		return h(ctx, req)
	}))
	srv.RegisterGRPC(g)
	go func() { _ = g.Serve(l) }()
	t.Cleanup(g.Stop)

	log := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	p, err := peer.New(peer.Options{Root: t.TempDir(), PieceSize: 64 << 10, Schedulers: []string{l.Addr().String()}, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	x, err := New(Options{Allowed: []string{reg.host()}, DefaultRegistry: reg.srv.URL, Logger: log}, p)
	if err != nil {
		t.Fatal(err)
	}
	ps := httptest.NewServer(x)
	t.Cleanup(ps.Close)

	req, _ := http.NewRequest(http.MethodGet, ps.URL+"/v2/team/private/blobs/"+dg, nil)
	req.Header.Set("Authorization", "Bearer team/private")
	req.Header.Set("Cookie", "session=secret")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !bytes.Equal(b, data) {
		t.Fatalf("authorised pull: %d, %d bytes", resp.StatusCode, len(b))
	}
	mu.Lock()
	defer mu.Unlock()
	registered := false
	for _, c := range seen {
		registered = registered || strings.Contains(c, "RegisterTask")
		if strings.Contains(c, "Bearer") || strings.Contains(c, "session=secret") {
			t.Errorf("a credential went to the scheduler: %s", c)
		}
	}
	if !registered {
		t.Fatalf("the task was never registered: the test proves nothing (%d calls)", len(seen))
	}
}

// A client's X-Dragonfly-Filter cannot put what URL?param=x returns into
// the task of the plain URL that other clients read.
func TestClientFilterDoesNotPoisonPlainURL(t *testing.T) {
	var gets atomic.Int32
	files := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		gets.Add(1)
		body := "good bytes of the file"
		if r.URL.Query().Get("version") != "" {
			body = "EVIL bytes of the file"
		}
		http.ServeContent(w, r, "", time.Time{}, strings.NewReader(body))
	}))
	defer files.Close()
	e := newAttackEnv(t, Options{Allowed: []string{strings.TrimPrefix(files.URL, "http://")}})
	pu, _ := url.Parse(e.srv.URL)
	client := &http.Client{Transport: &http.Transport{Proxy: http.ProxyURL(pu)}}
	get := func(u, filter string) string {
		t.Helper()
		req, _ := http.NewRequest(http.MethodGet, u, nil)
		req.Header.Set(HeaderUseP2P, "true")
		if filter != "" {
			req.Header.Set(HeaderFilter, filter)
		}
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if resp.Header.Get(HeaderTask) == "" {
			t.Fatalf("%s did not go through P2P: %d %q", u, resp.StatusCode, b)
		}
		return string(b)
	}
	if got := get(files.URL+"/app.tar?version=evil", "version"); !strings.HasPrefix(got, "EVIL") {
		t.Fatalf("attacker's fetch: %q", got)
	}
	if got := get(files.URL+"/app.tar", ""); !strings.HasPrefix(got, "good") {
		t.Fatalf("the plain URL served %q", got)
	}
	// Clients that make the same claim still share one task.
	before := gets.Load()
	if got := get(files.URL+"/app.tar?version=other", "version"); !strings.HasPrefix(got, "EVIL") {
		t.Fatalf("same filter: %q", got)
	}
	if n := gets.Load() - before; n > 1 {
		t.Errorf("a task shared by the same filter asked the origin %d times, want the access check only", n)
	}
}
