package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/cobra"

	"github.com/starling-dev/starling/internal/testenv"
	"github.com/starling-dev/starling/pkg/peer"
	"github.com/starling-dev/starling/pkg/proxy"
	"github.com/starling-dev/starling/pkg/registry"
)

// runCmd runs a subcommand in this process the way main does, with the
// global flags at their defaults and no configuration file.
func runCmd(t *testing.T, mk func() *cobra.Command, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	g = globals{configPath: filepath.Join(t.TempDir(), "none.toml"), output: "text", logLevel: "warn"}
	for i := 0; i < len(args); i++ {
		// The persistent flags live on the root in main; take them here.
		switch args[i] {
		case "--output", "-o":
			g.output = args[i+1]
			args = append(args[:i:i], args[i+2:]...)
			i--
		}
	}
	cmd := mk()
	var out, errb bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&errb)
	cmd.SetArgs(args)
	cmd.SilenceUsage = true
	cmd.SilenceErrors = true
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	err = cmd.ExecuteContext(ctx)
	return out.String(), errb.String(), err
}

// pushBlob pushes size random bytes to repo NAME of reg and returns the
// blob's URL and digest.
func pushBlob(t *testing.T, reg *testenv.Registry, repoName string, size int) (url string, digest v1.Hash, data []byte) {
	t.Helper()
	data = make([]byte, size)
	if _, err := rand.Read(data); err != nil {
		t.Fatal(err)
	}
	c := registry.New(registry.DefaultConfig())
	repo, err := c.ParseRepository(reg.Addr + "/" + repoName)
	if err != nil {
		t.Fatal(err)
	}
	l := static.NewLayer(data, types.OCILayer)
	if err := c.WriteLayer(context.Background(), repo, l); err != nil {
		t.Fatal(err)
	}
	d, _ := l.Digest()
	return registry.BlobURL(repo, d), d, data
}

// noLeftovers fails when dir holds anything but want.
func noLeftovers(t *testing.T, dir string, want ...string) {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if !slices.Contains(want, e.Name()) {
			t.Errorf("left behind in %s: %s", dir, e.Name())
		}
	}
}

func TestGetStandaloneRegistryBlob(t *testing.T) {
	reg := testenv.StartRegistry(t)
	// Over two pieces and a bit, so the pieces are stitched in order.
	url, d, data := pushBlob(t, reg, "get/blob", 9<<20+12345)
	dir := t.TempDir()
	file := filepath.Join(dir, "blob")

	out, _, err := runCmd(t, newGetCmd, "--standalone", url, "-O", file, "--digest", d.String(), "--output", "json")
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatalf("file differs from the blob (%d bytes, want %d)", len(got), len(data))
	}
	var res getOutput
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("output is not JSON: %v\n%s", err, out)
	}
	if res.URL != url || res.File != file || res.Bytes != int64(len(data)) || res.Digest != d.String() || res.Via != "standalone" {
		t.Errorf("output = %+v", res)
	}
	noLeftovers(t, dir, "blob")

	// To stdout.
	out, _, err = runCmd(t, newGetCmd, "--standalone", url, "-O", "-")
	if err != nil {
		t.Fatal(err)
	}
	if out != string(data) {
		t.Fatalf("stdout differs from the blob (%d bytes)", len(out))
	}
}

func TestGetWrongDigest(t *testing.T) {
	reg := testenv.StartRegistry(t)
	url, d, _ := pushBlob(t, reg, "get/wrong", 1<<20)
	dir := t.TempDir()
	file := filepath.Join(dir, "blob")
	wrong := "sha256:" + strings.Repeat("ab", 32)

	_, _, err := runCmd(t, newGetCmd, "--standalone", url, "-O", file, "--digest", wrong)
	if err == nil {
		t.Fatal("no error for a wrong --digest")
	}
	msg := err.Error()
	for _, want := range []string{url, wrong, d.String(), "mismatch"} {
		if !strings.Contains(msg, want) {
			t.Errorf("error %q does not name %s", msg, want)
		}
	}
	if strings.Contains(msg, "\n") {
		t.Errorf("error is not one line: %q", msg)
	}
	noLeftovers(t, dir)

	// A malformed digest is refused before anything is fetched.
	if _, _, err := runCmd(t, newGetCmd, "--standalone", url, "-O", file, "--digest", "sha256:xyz"); err == nil || !strings.Contains(err.Error(), "--digest") {
		t.Errorf("malformed --digest: err = %v", err)
	}
	noLeftovers(t, dir)
}

func TestGetUnreachableOrigin(t *testing.T) {
	testenv.Require(t)
	dir := t.TempDir()
	file := filepath.Join(dir, "x")
	url := "http://127.0.0.1:" + testenv.Itoa(testenv.FreePort(t)) + "/some/file"
	_, _, err := runCmd(t, newGetCmd, "--standalone", url, "-O", file)
	if err == nil {
		t.Fatal("no error for an unreachable origin")
	}
	if msg := err.Error(); strings.Contains(msg, "\n") || !strings.Contains(msg, url) {
		t.Errorf("error should be one line naming the URL: %q", msg)
	}
	noLeftovers(t, dir)
}

// TestGetFallbackAndHeaders: with no proxy listening the command says so
// and downloads standalone; -H reaches the origin, and an origin that
// refuses is one clear error.
func TestGetFallbackAndHeaders(t *testing.T) {
	testenv.Require(t)
	data := make([]byte, 5<<20+7)
	if _, err := rand.Read(data); err != nil {
		t.Fatal(err)
	}
	origin := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer s3cret" || r.Header.Get("X-Extra") != "1" {
			http.Error(w, "who are you", http.StatusUnauthorized)
			return
		}
		http.ServeContent(w, r, "file.bin", time.Time{}, bytes.NewReader(data))
	}))
	t.Cleanup(origin.Close)
	url := origin.URL + "/file.bin?X-Amz-Signature=abc"
	dir := t.TempDir()
	file := filepath.Join(dir, "file.bin")
	deadProxy := "127.0.0.1:" + testenv.Itoa(testenv.FreePort(t))
	sum := sha256.Sum256(data)
	digest := "sha256:" + hex.EncodeToString(sum[:])

	out, stderr, err := runCmd(t, newGetCmd, url, "-O", file, "--proxy", deadProxy,
		"-H", "Authorization: Bearer s3cret", "-H", "X-Extra: 1", "--digest", digest, "--tag", "t1", "--output", "json")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(stderr, deadProxy) || !strings.Contains(stderr, "standalone") || strings.Count(strings.TrimSpace(stderr), "\n") != 0 {
		t.Errorf("the fallback should be one line naming the proxy: %q", stderr)
	}
	var res getOutput
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("output is not JSON: %v\n%s", err, out)
	}
	if res.Via != "standalone" || res.Digest != digest {
		t.Errorf("output = %+v", res)
	}
	got, _ := os.ReadFile(file)
	if !bytes.Equal(got, data) {
		t.Fatal("file differs from the origin's")
	}

	// Without the header the origin refuses: one line, nothing left.
	os.Remove(file)
	_, _, err = runCmd(t, newGetCmd, "--standalone", url, "-O", file)
	if err == nil {
		t.Fatal("no error when the origin refuses")
	}
	if msg := err.Error(); strings.Contains(msg, "\n") || !strings.Contains(msg, "Unauthorized") {
		t.Errorf("error = %q", msg)
	}
	noLeftovers(t, dir)
}

func TestParseHeaders(t *testing.T) {
	h, err := parseHeaders([]string{"Authorization: Bearer a:b", "X-A:1", "X-A: 2"})
	if err != nil {
		t.Fatal(err)
	}
	if h.Get("Authorization") != "Bearer a:b" || len(h.Values("X-A")) != 2 {
		t.Errorf("headers = %v", h)
	}
	for _, bad := range []string{"NoColon", ": v", "Bad Key: v"} {
		if _, err := parseHeaders([]string{bad}); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestDialable(t *testing.T) {
	for in, want := range map[string]string{
		"127.0.0.1:4001": "127.0.0.1:4001",
		":4001":          "127.0.0.1:4001",
		"0.0.0.0:4001":   "127.0.0.1:4001",
		"[::]:4001":      "127.0.0.1:4001",
		"10.0.0.5:4001":  "10.0.0.5:4001",
	} {
		if got := dialable(in); got != want {
			t.Errorf("dialable(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestGetInterrupted runs the binary against an origin that stalls mid-
// body and interrupts it: nothing may be left, neither the partial file
// nor the standalone peer's storage.
func TestGetInterrupted(t *testing.T) {
	testenv.Require(t)
	bin := testenv.Bin(t, "starling")
	const size = 8 << 20
	started := make(chan struct{}, 16)
	release := make(chan struct{})
	origin := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", testenv.Itoa(size))
		if r.Method == http.MethodHead {
			return
		}
		// Ignore the range: a whole body that stops after 64 KiB.
		w.WriteHeader(http.StatusOK)
		_, _ = w.Write(make([]byte, 64<<10))
		w.(http.Flusher).Flush()
		started <- struct{}{}
		select {
		case <-r.Context().Done():
		case <-release:
		}
	}))
	t.Cleanup(func() { close(release); origin.Close() })
	dir := t.TempDir()
	tmp := t.TempDir()
	file := filepath.Join(dir, "big")
	cfg := filepath.Join(t.TempDir(), "starlingd.toml")
	if err := os.WriteFile(cfg, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	p := testenv.Start(t, "get", []string{"TMPDIR=" + tmp}, bin, "get", "--standalone",
		"--config", cfg, origin.URL+"/big", "-O", file)
	select {
	case <-started:
	case <-time.After(30 * time.Second):
		t.Fatalf("the origin was never asked:\n%s", p.Log())
	}
	if err := p.Cmd.Process.Signal(os.Interrupt); err != nil {
		t.Fatal(err)
	}
	testenv.WaitFor(t, 20*time.Second, "starling get to exit", p.Exited)
	if p.Cmd.ProcessState.ExitCode() == 0 {
		t.Errorf("exit status 0 after an interrupt")
	}
	if log := p.Log(); !strings.Contains(log, "interrupted") {
		t.Errorf("output does not say interrupted:\n%s", log)
	}
	noLeftovers(t, dir)
	noLeftovers(t, tmp)
}

// TestGetThroughProxy runs the real proxy of starlingd, with its peer, in
// this process and downloads through it: a registry blob over http, and a
// blob of an https origin (proxy form, no CONNECT), with headers.
func TestGetThroughProxy(t *testing.T) {
	reg := testenv.StartRegistry(t)
	url, d, data := pushBlob(t, reg, "get/proxied", 6<<20+99)

	tlsData := make([]byte, 3<<20+5)
	if _, err := rand.Read(tlsData); err != nil {
		t.Fatal(err)
	}
	tlsSum := sha256.Sum256(tlsData)
	tlsDigest := "sha256:" + hex.EncodeToString(tlsSum[:])
	var sawAuth atomic.Bool
	tlsOrigin := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer tls" {
			http.Error(w, "no", http.StatusUnauthorized)
			return
		}
		sawAuth.Store(true)
		http.ServeContent(w, r, "blob", time.Time{}, bytes.NewReader(tlsData))
	}))
	t.Cleanup(tlsOrigin.Close)

	metrics := prometheus.NewRegistry()
	p, err := peer.New(peer.Options{Root: t.TempDir(), Client: tlsOrigin.Client(), Registerer: metrics})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	x, err := proxy.New(proxy.Options{Transport: tlsOrigin.Client().Transport, Allowed: []string{"127.0.0.1:*"}}, p)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(x)
	t.Cleanup(srv.Close)
	proxyAddr := strings.TrimPrefix(srv.URL, "http://")

	dir := t.TempDir()
	file := filepath.Join(dir, "blob")
	out, _, err := runCmd(t, newGetCmd, url, "-O", file, "--proxy", proxyAddr, "--digest", d.String(), "--output", "json")
	if err != nil {
		t.Fatal(err)
	}
	var res getOutput
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("output is not JSON: %v\n%s", err, out)
	}
	if res.Via != "proxy" || res.Bytes != int64(len(data)) {
		t.Errorf("output = %+v", res)
	}
	if got, _ := os.ReadFile(file); !bytes.Equal(got, data) {
		t.Fatal("file differs from the blob")
	}
	if n := testenv.Counter(t, metrics, "starling_peer_piece_bytes_total", "source", "origin"); n < float64(len(data)) {
		t.Errorf("the peer fetched %v bytes from the origin: the blob did not go through P2P", n)
	}

	tlsURL := tlsOrigin.URL + "/v2/app/blobs/" + tlsDigest
	file2 := filepath.Join(dir, "tls")
	if _, _, err := runCmd(t, newGetCmd, tlsURL, "-O", file2, "--proxy", proxyAddr, "-H", "Authorization: Bearer tls"); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(file2); !bytes.Equal(got, tlsData) {
		t.Fatal("file differs from the https origin's blob")
	}
	if !sawAuth.Load() {
		t.Error("the Authorization header never reached the origin")
	}
	noLeftovers(t, dir, "blob", "tls")

	// The origin's refusal comes back as one line naming the proxy. (The
	// blob itself is now served from the peer's storage without asking.)
	_, _, err = runCmd(t, newGetCmd, tlsOrigin.URL+"/other", "-O", filepath.Join(dir, "x"), "--proxy", proxyAddr)
	t.Logf("refused: %v", err)
	if err == nil || strings.Contains(err.Error(), "\n") || !strings.Contains(err.Error(), proxyAddr) {
		t.Errorf("refused download: err = %v", err)
	}
	noLeftovers(t, dir, "blob", "tls")
}
