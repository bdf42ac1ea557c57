package main

import (
	"context"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/starling-dev/starling/internal/testenv"
	"github.com/starling-dev/starling/pkg/config"
)

// parse runs the command line with args and returns the configuration run
// would get.
func parse(t *testing.T, args ...string) (config.Daemon, error) {
	t.Helper()
	var got config.Daemon
	cmd := newCommand(func(_ context.Context, cfg config.Daemon) error {
		got = cfg
		return nil
	})
	cmd.SetArgs(args)
	cmd.SetOut(io.Discard)
	cmd.SetErr(io.Discard)
	err := cmd.ExecuteContext(context.Background())
	return got, err
}

func writeFile(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "starlingd.toml")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestConfigFileAndFlags(t *testing.T) {
	path := writeFile(t, `
root = "/srv/starling"
log_level = "debug"
health_listen = "127.0.0.1:9003"
[peer]
  role = "seed"
  schedulers = ["s1:8002"]
  upload_listen = ":7000"
[proxy]
  listen = "127.0.0.1:7001"
`)
	// The file alone.
	cfg, err := parse(t, "--config", path)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Root != "/srv/starling" || cfg.LogLevel != "debug" || cfg.HealthListen != "127.0.0.1:9003" ||
		cfg.Peer.Role != "seed" || !reflect.DeepEqual(cfg.Peer.Schedulers, []string{"s1:8002"}) ||
		cfg.Peer.UploadListen != ":7000" || cfg.Proxy.Listen != "127.0.0.1:7001" {
		t.Errorf("from the file: %+v", cfg)
	}
	// What the file does not set keeps its default.
	d := config.Default()
	if cfg.MetricsListen != d.MetricsListen || cfg.Snapshotter.Address != d.Snapshotter.Address || cfg.Snapshotter.Enable != d.Snapshotter.Enable {
		t.Errorf("defaults lost: metrics %q address %q snapshotter %v", cfg.MetricsListen, cfg.Snapshotter.Address, cfg.Snapshotter.Enable)
	}

	// Flags the user set override the file; the others leave it alone.
	cfg, err = parse(t, "--config", path, "--root", "/tmp/x", "--role", "peer", "--scheduler", " a:1, b:2 ,",
		"--snapshotter=false", "--peer=true", "--proxy-listen", "")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Root != "/tmp/x" || cfg.Peer.Role != "peer" || !reflect.DeepEqual(cfg.Peer.Schedulers, []string{"a:1", "b:2"}) ||
		cfg.Snapshotter.Enable || !cfg.Peer.Enable || cfg.Proxy.Listen != "" {
		t.Errorf("flags: %+v", cfg)
	}
	if cfg.LogLevel != "debug" || cfg.HealthListen != "127.0.0.1:9003" || cfg.Peer.UploadListen != ":7000" {
		t.Errorf("a flag not given replaced the file's value: %+v", cfg)
	}
}

func TestConfigErrors(t *testing.T) {
	// A file named on the command line must exist; the default path need not.
	missing := filepath.Join(t.TempDir(), "missing.toml")
	if _, err := parse(t, "--config", missing); err == nil || !strings.Contains(err.Error(), missing) {
		t.Errorf("missing named file: %v", err)
	}
	// A typo is an error, never a silent default.
	bad := writeFile(t, "[peer]\n  rol = \"seed\"\n")
	if _, err := parse(t, "--config", bad); err == nil || !strings.Contains(err.Error(), "peer.rol") {
		t.Errorf("unknown key: %v", err)
	}
	if _, err := parse(t, "--config", writeFile(t, ""), "extra-arg"); err == nil {
		t.Error("an argument was accepted")
	}
}

// freeAddr is a loopback address with a port nobody listens on.
func freeAddr(t *testing.T) string {
	return "127.0.0.1:" + testenv.Itoa(testenv.FreePort(t))
}

// get fetches url without keeping the connection, so that no client
// goroutine outlives the test.
func get(url string) (int, string, error) {
	c := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 5 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

// startDaemon runs starlingd with args until the returned stop is called,
// which returns run's error.
func startDaemon(t *testing.T, args ...string) (stop func() error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	cmd := newCommand(run)
	cmd.SetArgs(append([]string{"--config", writeFile(t, ""), "--root", t.TempDir(), "--log-level", "error"}, args...))
	go func() { done <- cmd.ExecuteContext(ctx) }()
	var err error
	stopped := false
	return func() error {
		if !stopped {
			cancel()
			select {
			case err = <-done:
			case <-time.After(30 * time.Second):
				t.Fatal("starlingd did not stop within 30s of its context ending")
			}
			stopped = true
		}
		return err
	}
}

func TestDaemonPeerOnlyStartsAndStops(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	health, metrics, proxyAddr := freeAddr(t), freeAddr(t), freeAddr(t)
	stop := startDaemon(t, "--snapshotter=false", "--peer", "--advertise-ip", "127.0.0.1",
		"--upload-listen", "127.0.0.1:0", "--proxy-listen", proxyAddr,
		"--health-listen", health, "--metrics-listen", metrics)
	defer stop()

	testenv.WaitFor(t, 20*time.Second, "the health endpoint", func() bool {
		code, body, err := get("http://" + health + "/healthy")
		return err == nil && code == http.StatusOK && body == "OK"
	})
	if code, body, err := get("http://" + health + "/server/ping"); err != nil || code != http.StatusOK || body != "OK" {
		t.Errorf("/server/ping: %d %q %v", code, body, err)
	}
	// The peer's metrics are served, beside the process's.
	if code, body, err := get("http://" + metrics + "/metrics"); err != nil || code != http.StatusOK ||
		!strings.Contains(body, "starling_peer_scheduler_up") || !strings.Contains(body, "go_goroutines") ||
		!strings.Contains(body, `starling_origin_requests_in_flight{priority="seed"}`) {
		t.Errorf("/metrics: %d %v, peer metrics present: %v", code, err, strings.Contains(body, "starling_peer_scheduler_up"))
	}
	// The proxy answers (a request with no upstream to name is refused, not dropped).
	if _, _, err := get("http://" + proxyAddr + "/v2/"); err != nil {
		t.Errorf("proxy: %v", err)
	}
	if err := stop(); err != nil {
		t.Fatalf("run: %v", err)
	}
	// Everything listened on is free again.
	for _, a := range []string{health, metrics, proxyAddr} {
		l, err := net.Listen("tcp", a)
		if err != nil {
			t.Errorf("%s still taken after shutdown: %v", a, err)
			continue
		}
		l.Close()
	}
}

// A component that cannot start stops those already started, and run says
// which one failed.
func TestDaemonStartFailureStopsTheRest(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	stop := startDaemon(t, "--snapshotter=false", "--peer", "--advertise-ip", "127.0.0.1",
		"--upload-listen", "127.0.0.1:0", "--proxy-listen", freeAddr(t),
		"--metrics-listen", "", "--health-listen", taken.Addr().String())
	err = stop()
	if err == nil || !strings.Contains(err.Error(), "health listen "+taken.Addr().String()) {
		t.Fatalf("run: %v", err)
	}

	stop = startDaemon(t, "--snapshotter=false", "--peer", "--role", "leader", "--metrics-listen", "", "--health-listen", "")
	if err := stop(); err == nil || !strings.Contains(err.Error(), `peer role "leader"`) {
		t.Fatalf("bad role: %v", err)
	}
}
