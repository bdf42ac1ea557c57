// Package mirror_test pulls images with a real containerd through
// starling's registry mirror, configured the way users do it: the hosts
// directory that `starling setup containerd --mirror` writes.
package mirror_test

import (
	"context"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/starling-dev/starling/internal/testenv"
	"github.com/starling-dev/starling/pkg/peer"
	"github.com/starling-dev/starling/pkg/proxy"
	"github.com/starling-dev/starling/pkg/registry"
)

// startMirror runs a standalone peer and the proxy on a loopback port.
func startMirror(t *testing.T, reg *prometheus.Registry) string {
	t.Helper()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	p, err := peer.New(peer.Options{Root: t.TempDir(), PieceSize: 1 << 20, Registerer: reg, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	// The test's registry is on loopback, which only an entry naming the
	// host admits (as a node's configured registries do).
	x, err := proxy.New(proxy.Options{Registerer: reg, Logger: log, Allowed: []string{"127.0.0.1:*"}}, p)
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: x}
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(func() { srv.Close() })
	return l.Addr().String()
}

func TestContainerdPullsThroughMirror(t *testing.T) {
	testenv.Require(t, "docker-registry", "containerd", "runc", "ctr")
	reg := testenv.StartRegistry(t)
	// The registry's side of the traffic, counted per blob.
	origin := testenv.StartCountingProxy(t, reg.Addr)

	img, err := random.Image(3<<20, 3)
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", runtime.GOARCH
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		t.Fatal(err)
	}
	c := registry.New(registry.DefaultConfig())
	r, err := c.ParseReference(reg.Addr + "/mirror/img:v1")
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Write(context.Background(), r, img); err != nil {
		t.Fatal(err)
	}
	ref := origin.Addr + "/mirror/img:v1"
	blobs := map[v1.Hash]int64{}
	layers, _ := img.Layers()
	for _, l := range layers {
		d, _ := l.Digest()
		n, _ := l.Size()
		blobs[d] = n
	}
	cfgName, _ := img.ConfigName()
	cfgRaw, _ := img.RawConfigFile()
	blobs[cfgName] = int64(len(cfgRaw))

	pr := prometheus.NewRegistry()
	mirror := startMirror(t, pr)

	// The hosts directory, written by the command users run.
	dir := t.TempDir()
	hostsDir := filepath.Join(dir, "certs.d")
	if err := os.WriteFile(filepath.Join(dir, "starlingd.toml"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	out := testenv.Run(t, testenv.Bin(t, "starling"), "--config", filepath.Join(dir, "starlingd.toml"),
		"setup", "containerd", "--mirror", "--write", "--hosts-dir", hostsDir,
		"--config-path", filepath.Join(dir, "config.toml"), "--registry", origin.Addr, "--mirror-address", mirror)
	t.Logf("setup containerd --mirror:\n%s", out)
	if b, err := os.ReadFile(filepath.Join(hostsDir, origin.Addr, "hosts.toml")); err != nil || !strings.Contains(string(b), `server = "http://`+origin.Addr+`"`) {
		t.Fatalf("hosts.toml: %v\n%s", err, b)
	}

	// Two nodes' containerds pull the image; the second one's blobs come
	// from the peer's storage, not from the registry.
	for i := range 2 {
		ctd := testenv.StartContainerd(t, testenv.ContainerdOptions{})
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		out, err := ctd.Ctr(ctx, "image", "pull", "--hosts-dir", hostsDir, ref)
		cancel()
		if err != nil {
			t.Fatalf("pull %d: %v\n%s", i, err, out)
		}
		if out, err := ctd.Ctr(context.Background(), "image", "check"); err != nil || !strings.Contains(out, "complete") {
			t.Fatalf("image check after pull %d: %v\n%s", i, err, out)
		}
	}

	var total int64
	for d, n := range blobs {
		total += n
		if got := origin.BlobBytes(d.String()); got != n {
			t.Errorf("blob %s (%d bytes): the registry sent %d bytes, want %d (once, for both pulls)", d, n, got, n)
		}
	}
	p2pReqs := testenv.Counter(t, pr, "starling_proxy_requests_total", "path", "p2p")
	p2pBytes := testenv.Counter(t, pr, "starling_proxy_bytes_total", "path", "p2p")
	direct := testenv.Counter(t, pr, "starling_proxy_requests_total", "path", "direct")
	t.Logf("proxy: %v p2p requests (%v bytes), %v direct; registry: %d requests", p2pReqs, p2pBytes, direct, origin.Requests())
	if p2pReqs < float64(2*len(blobs)) {
		t.Errorf("%v requests went through P2P, want at least %d (every blob, twice)", p2pReqs, 2*len(blobs))
	}
	if p2pBytes < float64(2*total) {
		t.Errorf("%v bytes went through P2P, want at least %d", p2pBytes, 2*total)
	}
	if direct == 0 {
		t.Error("no manifest request went straight to the registry")
	}
	if got := testenv.Counter(t, pr, "starling_peer_piece_bytes_total", "source", "origin"); got != float64(total) {
		t.Errorf("the peer fetched %v bytes from the origin, want %d", got, total)
	}
}
