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
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/starling-dev/starling/internal/testenv"
	"github.com/starling-dev/starling/pkg/config"
	"github.com/starling-dev/starling/pkg/peer"
	"github.com/starling-dev/starling/pkg/registry"
)

// env is a registry (behind a counting proxy), a standalone peer and the
// proxy under test, served on loopback.
type env struct {
	t     *testing.T
	reg   *testenv.Registry
	count *testenv.CountingProxy
	peer  *peer.Peer
	peerR *prometheus.Registry
	x     *Proxy
	srv   *httptest.Server
}

func newEnv(t *testing.T, o Options) *env {
	t.Helper()
	e := &env{t: t, reg: testenv.StartRegistry(t)}
	e.count = testenv.StartCountingProxy(t, e.reg.Addr)
	e.peerR = prometheus.NewRegistry()
	p, err := peer.New(peer.Options{Root: t.TempDir(), PieceSize: 1 << 20, Registerer: e.peerR,
		Logger: slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	e.peer = p
	if o.Logger == nil {
		o.Logger = slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	if o.Allowed == nil {
		// The test registries listen on loopback, named exactly.
		o.Allowed = []string{"127.0.0.1:*"}
	}
	if e.x, err = New(o, p); err != nil {
		t.Fatal(err)
	}
	e.srv = httptest.NewServer(e.x)
	t.Cleanup(e.srv.Close)
	return e
}

// testWriter sends logs to t.Log, so they show only for failed tests.
type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(b)))
	return len(b), nil
}

// pushBlob stores size random bytes as a blob of repo and returns them and their digest.
func (e *env) pushBlob(repo string, size int) ([]byte, string) {
	e.t.Helper()
	data := make([]byte, size)
	rand.Read(data)
	c := registry.New(registry.DefaultConfig())
	r, err := c.ParseRepository(e.reg.Addr + "/" + repo)
	if err != nil {
		e.t.Fatal(err)
	}
	if err := c.WriteLayer(context.Background(), r, static.NewLayer(data, types.DockerLayer)); err != nil {
		e.t.Fatal(err)
	}
	sum := sha256.Sum256(data)
	return data, "sha256:" + hex.EncodeToString(sum[:])
}

func (e *env) get(path string, hdr map[string]string) *http.Response {
	e.t.Helper()
	return e.do(http.MethodGet, path, hdr)
}

func (e *env) do(method, path string, hdr map[string]string) *http.Response {
	e.t.Helper()
	req, err := http.NewRequest(method, e.srv.URL+path, nil)
	if err != nil {
		e.t.Fatal(err)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultTransport.RoundTrip(req)
	if err != nil {
		e.t.Fatalf("%s %s: %v", method, path, err)
	}
	e.t.Cleanup(func() { resp.Body.Close() })
	return resp
}

func (e *env) requests(path string) float64 {
	return counterValue(e.x.m.requests.WithLabelValues(path))
}

// counterValue reads one counter.
func counterValue(c prometheus.Counter) float64 {
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		panic(err)
	}
	return m.GetCounter().GetValue()
}

func body(t *testing.T, resp *http.Response) []byte {
	t.Helper()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("read body: %v", err)
	}
	return b
}

func digestOf(b []byte) string {
	sum := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(sum[:])
}

func TestMirrorBlobThroughP2P(t *testing.T) {
	e := newEnv(t, Options{})
	size := 5<<20 + 12345 // six pieces, the last one short
	data, dg := e.pushBlob("p2p/blob", size)
	path := "/v2/p2p/blob/blobs/" + dg

	// Upstream named by the header, through the counting proxy.
	resp := e.get(path, map[string]string{HeaderRegistry: "http://" + e.count.Addr})
	b := body(t, resp)
	if resp.StatusCode != http.StatusOK || !bytes.Equal(b, data) {
		t.Fatalf("GET: status %d, %d bytes, digest %s; want 200, %d bytes, %s", resp.StatusCode, len(b), digestOf(b), size, dg)
	}
	task, _ := RegistryTaskID(must(url.Parse("http://" + e.count.Addr + path)))
	for k, want := range map[string]string{"Content-Length": fmt.Sprint(size), "Docker-Content-Digest": dg, HeaderTask: task, "Accept-Ranges": "bytes"} {
		if got := resp.Header.Get(k); got != want {
			t.Errorf("%s = %q, want %q", k, got, want)
		}
	}
	if got := e.requests("p2p"); got != 1 {
		t.Errorf("p2p requests = %v, want 1", got)
	}
	if got := counterValue(e.x.m.bytes.WithLabelValues("p2p")); got != float64(size) {
		t.Errorf("p2p bytes = %v, want %d", got, size)
	}

	// Upstream named by containerd's ns (a loopback registry: plain HTTP):
	// the same blob of the same registry is the same task, already held,
	// so the origin sends nothing more.
	resp = e.get(path+"?ns="+e.count.Addr, nil)
	if b := body(t, resp); resp.StatusCode != http.StatusOK || digestOf(b) != dg || resp.Header.Get(HeaderTask) != task {
		t.Fatalf("GET ?ns=: status %d, digest %s, task %s, want 200 %s %s", resp.StatusCode, digestOf(b), resp.Header.Get(HeaderTask), dg, task)
	}
	if got := e.count.BlobBytes(dg); got != int64(size) {
		t.Errorf("the origin sent %d bytes of the blob, want %d (once)", got, size)
	}
	// Another registry is another task: its pieces never serve the first's.
	resp = e.get(path+"?ns="+e.reg.Addr, nil)
	if b := body(t, resp); resp.StatusCode != http.StatusOK || digestOf(b) != dg || resp.Header.Get(HeaderTask) == task {
		t.Fatalf("GET ?ns= another registry: status %d, digest %s, task %s (the first registry's is %s)", resp.StatusCode, digestOf(b), resp.Header.Get(HeaderTask), task)
	}
	if got := e.requests("p2p"); got != 3 {
		t.Errorf("p2p requests = %v, want 3", got)
	}
	if got := e.requests("direct"); got != 0 {
		t.Errorf("direct requests = %v, want 0", got)
	}
}

func TestRangeRequests(t *testing.T) {
	e := newEnv(t, Options{})
	size := 3<<20 + 1000
	data, dg := e.pushBlob("range/blob", size)
	path := "/v2/range/blob/blobs/" + dg
	reg := map[string]string{HeaderRegistry: "http://" + e.reg.Addr}
	for _, c := range []struct {
		rng        string
		status     int
		off, n     int
		contentRng string
	}{
		{"bytes=-100", 206, size - 100, 100, fmt.Sprintf("bytes %d-%d/%d", size-100, size-1, size)},
		{"bytes=0-100", 206, 0, 101, fmt.Sprintf("bytes 0-100/%d", size)},
		{"bytes=100-", 206, 100, size - 100, fmt.Sprintf("bytes 100-%d/%d", size-1, size)},
		{"bytes=100-500", 206, 100, 401, fmt.Sprintf("bytes 100-500/%d", size)},
		// Across a piece boundary.
		{fmt.Sprintf("bytes=%d-%d", 1<<20-10, 1<<20+10), 206, 1<<20 - 10, 21, fmt.Sprintf("bytes %d-%d/%d", 1<<20-10, 1<<20+10, size)},
		// An end past the end is cut to the end.
		{fmt.Sprintf("bytes=%d-%d", size-5, size+100), 206, size - 5, 5, fmt.Sprintf("bytes %d-%d/%d", size-5, size-1, size)},
		{fmt.Sprintf("bytes=%d-", size), 416, 0, 0, fmt.Sprintf("bytes */%d", size)},
		{fmt.Sprintf("bytes=%d-%d", size+10, size+20), 416, 0, 0, fmt.Sprintf("bytes */%d", size)},
		// Ranges that ask for more than the blob: the whole blob.
		{"bytes=0-,0-", 200, 0, size, ""},
		// Several ranges of which only one is satisfiable: a plain 206.
		{fmt.Sprintf("bytes=10-20,%d-", size+5), 206, 10, 11, fmt.Sprintf("bytes 10-20/%d", size)},
	} {
		hdr := map[string]string{"Range": c.rng}
		for k, v := range reg {
			hdr[k] = v
		}
		resp := e.get(path, hdr)
		b := body(t, resp)
		if resp.StatusCode != c.status {
			t.Errorf("%s: status %d, want %d", c.rng, resp.StatusCode, c.status)
			continue
		}
		if got := resp.Header.Get("Content-Range"); got != c.contentRng {
			t.Errorf("%s: Content-Range %q, want %q", c.rng, got, c.contentRng)
		}
		if c.status == 416 {
			continue
		}
		if got := resp.Header.Get("Content-Length"); got != fmt.Sprint(c.n) {
			t.Errorf("%s: Content-Length %s, want %d", c.rng, got, c.n)
		}
		if !bytes.Equal(b, data[c.off:c.off+c.n]) {
			t.Errorf("%s: wrong bytes (%d of them)", c.rng, len(b))
		}
	}
}

func TestRangeFetchesOnlyCoveringPieces(t *testing.T) {
	for _, prefetch := range []bool{false, true} {
		t.Run(fmt.Sprintf("prefetch=%v", prefetch), func(t *testing.T) {
			e := newEnv(t, Options{Prefetch: prefetch})
			size := 8 << 20
			data, dg := e.pushBlob("cover/blob", size)
			resp := e.get("/v2/cover/blob/blobs/"+dg, map[string]string{HeaderRegistry: "http://" + e.count.Addr, "Range": "bytes=100-500"})
			if b := body(t, resp); resp.StatusCode != 206 || !bytes.Equal(b, data[100:501]) {
				t.Fatalf("status %d, %d bytes", resp.StatusCode, len(b))
			}
			if !prefetch {
				if got := e.count.BlobBytes(dg); got != 1<<20 {
					t.Fatalf("the origin sent %d bytes for a range inside the first piece, want one piece (%d)", got, 1<<20)
				}
				return
			}
			// The whole blob comes in the background.
			testenv.WaitFor(t, time.Minute, "the prefetched blob", func() bool { return e.count.BlobBytes(dg) == int64(size) })
			before := e.count.BlobBytes(dg)
			resp = e.get("/v2/cover/blob/blobs/"+dg, map[string]string{HeaderRegistry: "http://" + e.count.Addr})
			if b := body(t, resp); digestOf(b) != dg {
				t.Fatal("wrong blob after prefetch")
			}
			if e.count.BlobBytes(dg) != before {
				t.Fatal("the origin was asked again after the prefetch")
			}
		})
	}
}

func TestDirectRequests(t *testing.T) {
	e := newEnv(t, Options{})
	c := registry.New(registry.DefaultConfig())
	ref, err := c.ParseReference(e.reg.Addr + "/direct/img:v1")
	if err != nil {
		t.Fatal(err)
	}
	img, err := random.Image(2048, 2)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Write(context.Background(), ref, img); err != nil {
		t.Fatal(err)
	}
	raw, _ := img.RawManifest()
	mt, _ := img.MediaType()
	layers, _ := img.Layers()
	ld, _ := layers[0].Digest()

	resp := e.get("/v2/direct/img/manifests/v1?ns="+e.reg.Addr, map[string]string{"Accept": string(mt)})
	if b := body(t, resp); resp.StatusCode != 200 || !bytes.Equal(b, raw) {
		t.Fatalf("manifest: status %d, %q", resp.StatusCode, b)
	}
	resp = e.do(http.MethodHead, "/v2/direct/img/blobs/"+ld.String()+"?ns="+e.reg.Addr, nil)
	if resp.StatusCode != 200 || resp.Header.Get("Docker-Content-Digest") != ld.String() {
		t.Fatalf("HEAD blob: status %d, headers %v", resp.StatusCode, resp.Header)
	}
	// A GET that matches no rule.
	resp = e.get("/v2/", map[string]string{HeaderRegistry: "http://" + e.reg.Addr})
	if resp.StatusCode != 200 {
		t.Fatalf("GET /v2/: status %d", resp.StatusCode)
	}
	if got, want := e.requests("direct"), 3.0; got != want {
		t.Errorf("direct requests = %v, want %v", got, want)
	}
	if got := e.requests("p2p"); got != 0 {
		t.Errorf("p2p requests = %v, want 0", got)
	}
	if got := counterValue(e.x.m.bytes.WithLabelValues("direct")); got < float64(len(raw)) {
		t.Errorf("direct bytes = %v, want at least the manifest's %d", got, len(raw))
	}
}

func TestProxyForm(t *testing.T) {
	e := newEnv(t, Options{})
	data, dg := e.pushBlob("form/blob", 100000)
	pu, _ := url.Parse(e.srv.URL)
	client := &http.Client{Transport: &http.Transport{Proxy: http.ProxyURL(pu)}}
	resp, err := client.Get("http://" + e.reg.Addr + "/v2/form/blob/blobs/" + dg)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if b := body(t, resp); resp.StatusCode != 200 || !bytes.Equal(b, data) {
		t.Fatalf("status %d, %d bytes", resp.StatusCode, len(b))
	}
	if e.requests("p2p") != 1 {
		t.Fatal("a blob URL in proxy form did not go through P2P")
	}

	// A push through the proxy (POST, PATCH, PUT, HEAD) goes straight to
	// the registry.
	img, err := random.Image(300000, 2)
	if err != nil {
		t.Fatal(err)
	}
	ref, err := name.ParseReference(e.reg.Addr+"/form/pushed:v1", name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(ref, img, remote.WithTransport(client.Transport)); err != nil {
		t.Fatalf("push through the proxy: %v", err)
	}
	got, err := remote.Image(ref)
	if err != nil {
		t.Fatal(err)
	}
	if gd, _ := got.Digest(); gd != must(img.Digest()) {
		t.Fatalf("pushed %s, the registry has %s", must(img.Digest()), gd)
	}
	if e.requests("direct") < 4 {
		t.Fatalf("only %v direct requests for a push", e.requests("direct"))
	}

	// CONNECT is off by default.
	if out := connect(t, pu.Host, e.reg.Addr); !strings.HasPrefix(out, "HTTP/1.1 403") {
		t.Fatalf("CONNECT with proxy.connect off answered:\n%s", out)
	}
}

// connect sends a CONNECT to target through the proxy at addr, then a GET
// /v2/ through the tunnel, and returns all the proxy sent back.
func connect(t *testing.T, addr, target string) string {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(conn, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\nGET /v2/ HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", target, target, target)
	out, _ := io.ReadAll(conn)
	return string(out)
}

// With proxy.connect = "allowed", a tunnel to an allowed host on the TLS
// port works (the port is the test registry's here).
func TestConnectAllowed(t *testing.T) {
	e := newEnv(t, Options{Connect: "allowed"})
	pu, _ := url.Parse(e.srv.URL)
	_, port, _ := net.SplitHostPort(e.reg.Addr)
	e.x.connectPort = port
	out := connect(t, pu.Host, e.reg.Addr)
	if !strings.HasPrefix(out, "HTTP/1.1 200") || !strings.Contains(out, "\r\n\r\nHTTP/1.1 200 OK") {
		t.Fatalf("CONNECT tunnel answered:\n%s", out)
	}
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

func TestOriginErrorsRelayed(t *testing.T) {
	e := newEnv(t, Options{})
	_, dg := e.pushBlob("err/blob", 1000)
	missing := digestOf([]byte("not pushed"))
	resp := e.get("/v2/err/blob/blobs/"+missing+"?ns="+e.reg.Addr, nil)
	b := body(t, resp)
	if resp.StatusCode != http.StatusNotFound || !strings.Contains(string(b), "BLOB_UNKNOWN") {
		t.Fatalf("missing blob: status %d, body %q; want 404 BLOB_UNKNOWN", resp.StatusCode, b)
	}

	// A registry that wants a token, sharing the first one's storage.
	addr := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
	cfg := filepath.Join(t.TempDir(), "config.yml")
	os.WriteFile(cfg, []byte(fmt.Sprintf(`version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: %s
auth:
  silly:
    realm: http://127.0.0.1:1/token
    service: starling-test
http:
  addr: %s
  secret: starling-test
`, filepath.Join(e.reg.Dir, "data"), addr)), 0o644)
	p := testenv.Start(t, "auth-registry", nil, "docker-registry", "serve", cfg)
	testenv.WaitTCP(t, p, addr, 20*time.Second)

	path := "/v2/err/blob/blobs/" + dg + "?ns=" + addr
	resp = e.get(path, nil)
	body(t, resp)
	if resp.StatusCode != http.StatusUnauthorized || !strings.Contains(resp.Header.Get("Www-Authenticate"), `realm="http://127.0.0.1:1/token"`) {
		t.Fatalf("no token: status %d, WWW-Authenticate %q; want 401 with the registry's challenge", resp.StatusCode, resp.Header.Get("Www-Authenticate"))
	}
	resp = e.get(path, map[string]string{"Authorization": "Bearer a-token"})
	if b := body(t, resp); resp.StatusCode != 200 || digestOf(b) != dg {
		t.Fatalf("with a token: status %d, %q", resp.StatusCode, b)
	}
}

func TestWrongDigestNeverWhole(t *testing.T) {
	e := newEnv(t, Options{})
	size := 2<<20 + 7
	data, dg := e.pushBlob("bad/blob", size)
	// The registry serves what its storage holds without checking it.
	f := filepath.Join(e.reg.Dir, "data", "docker", "registry", "v2", "blobs", "sha256", dg[7:9], dg[7:], "data")
	bad := bytes.Clone(data)
	bad[size/2] ^= 0xff
	if err := os.WriteFile(f, bad, 0o644); err != nil {
		t.Fatal(err)
	}
	resp := e.get("/v2/bad/blob/blobs/"+dg+"?ns="+e.reg.Addr, nil)
	b, err := io.ReadAll(resp.Body)
	// When the check fails before the first byte is out (the first piece
	// came in last), the answer is a 502; after, the body is cut off.
	if resp.StatusCode == http.StatusBadGateway && err == nil {
		t.Logf("answered 502: %s", b)
		return
	}
	if resp.StatusCode != http.StatusOK || err == nil {
		t.Fatalf("a blob that does not match its digest came whole: status %d, %d bytes, digest %s, err %v", resp.StatusCode, len(b), digestOf(b), err)
	}
	if len(b) >= size {
		t.Fatalf("got %d bytes of %d", len(b), size)
	}
}

func TestUpstream(t *testing.T) {
	x, err := New(FromConfig(config.DefaultProxy(), registry.Config{Host: map[string]registry.HostConfig{"reg.lan:5000": {Insecure: true}}}), nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		uri  string
		hdr  string
		want string
	}{
		{"/v2/library/x/blobs/sha256:aa?ns=docker.io", "", "https://registry-1.docker.io/v2/library/x/blobs/sha256:aa"},
		{"/v2/x/manifests/v1?ns=reg.lan:5000", "", "http://reg.lan:5000/v2/x/manifests/v1"},
		{"/v2/x/manifests/v1?ns=ghcr.io&a=1", "", "https://ghcr.io/v2/x/manifests/v1?a=1"},
		{"/v2/x/manifests/v1?ns=127.0.0.1:5000", "", "http://127.0.0.1:5000/v2/x/manifests/v1"},
		{"/v2/x/manifests/v1?ns=ghcr.io", "http://10.0.0.2:5000", "http://10.0.0.2:5000/v2/x/manifests/v1"},
		{"/v2/x/blobs/sha256:aa?b=2&a=1", "https://mirror.example/prefix/", "https://mirror.example/prefix/v2/x/blobs/sha256:aa?b=2&a=1"},
		{"/v2/x/blobs/sha256:aa", "", "https://registry-1.docker.io/v2/x/blobs/sha256:aa"},
		{"http://files.example/a?X-Amz-Signature=1", "", "http://files.example/a?X-Amz-Signature=1"},
	} {
		req := httptest.NewRequest(http.MethodGet, c.uri, nil)
		if !strings.HasPrefix(c.uri, "/") {
			req.RequestURI = c.uri
		} else {
			req.URL.Host, req.URL.Scheme = "", ""
		}
		if c.hdr != "" {
			req.Header.Set(HeaderRegistry, c.hdr)
		}
		u, err := x.upstream(req)
		if err != nil {
			t.Errorf("%s: %v", c.uri, err)
			continue
		}
		if u.String() != c.want {
			t.Errorf("%s (%s): %s, want %s", c.uri, c.hdr, u, c.want)
		}
	}
	for _, bad := range []struct{ uri, hdr string }{
		{"/v2/x?ns=a/b", ""},
		{"/v2/x", "ftp://x"},
		{"/v2/x", "not a url"},
	} {
		req := httptest.NewRequest(http.MethodGet, bad.uri, nil)
		req.URL.Host, req.URL.Scheme = "", ""
		if bad.hdr != "" {
			req.Header.Set(HeaderRegistry, bad.hdr)
		}
		if u, err := x.upstream(req); err == nil {
			t.Errorf("%s %s: accepted as %s", bad.uri, bad.hdr, u)
		}
	}
}

func TestOriginHeader(t *testing.T) {
	in := http.Header{}
	for k, v := range map[string]string{"Authorization": "Bearer t", "User-Agent": "containerd/1.6", "Accept": "*/*",
		"Range": "bytes=0-1", "Connection": "close, X-Hop", "X-Hop": "1", "Accept-Encoding": "gzip",
		HeaderRegistry: "http://r", "Proxy-Authorization": "Basic x", "If-None-Match": `"x"`} {
		in.Set(k, v)
	}
	h := originHeader(in)
	for _, k := range []string{"Authorization", "User-Agent", "Accept"} {
		if h.Get(k) != in.Get(k) {
			t.Errorf("%s dropped", k)
		}
	}
	for _, k := range []string{"Range", "Connection", "X-Hop", "Accept-Encoding", HeaderRegistry, "Proxy-Authorization", "If-None-Match"} {
		if h.Get(k) != "" {
			t.Errorf("%s sent to the origin", k)
		}
	}
}

func TestBadRules(t *testing.T) {
	if _, err := New(Options{Rules: []string{"("}}, nil); err == nil {
		t.Fatal("a bad regexp was accepted")
	}
	if _, err := New(Options{DefaultRegistry: "registry.example"}, nil); err == nil {
		t.Fatal("a default registry without scheme was accepted")
	}
}

func TestNoRulesNoP2P(t *testing.T) {
	e := newEnv(t, Options{Rules: []string{}})
	_, dg := e.pushBlob("norules/blob", 1000)
	resp := e.get("/v2/norules/blob/blobs/"+dg+"?ns="+e.reg.Addr, nil)
	if b := body(t, resp); resp.StatusCode != 200 || digestOf(b) != dg {
		t.Fatalf("status %d", resp.StatusCode)
	}
	if e.requests("p2p") != 0 || e.requests("direct") != 1 {
		t.Fatal("an empty rule list still sent a blob through P2P")
	}
}
