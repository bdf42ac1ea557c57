package main

import (
	"context"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/starling-dev/starling/api/schedulerpb"
	"github.com/starling-dev/starling/internal/testenv"
	"github.com/starling-dev/starling/pkg/config"
)

func TestSchedulerConfig(t *testing.T) {
	dir := t.TempDir()
	c, err := config.LoadScheduler(filepath.Join(dir, "missing.toml"), false)
	if err != nil || !reflect.DeepEqual(c, config.DefaultScheduler()) || c.Validate() != nil {
		t.Fatalf("no file: %+v %v", c, err)
	}
	if _, err := config.LoadScheduler(filepath.Join(dir, "missing.toml"), true); err == nil {
		t.Fatal("a missing named file was accepted")
	}
	p := filepath.Join(dir, "scheduler.toml")
	os.WriteFile(p, []byte("listen = \"127.0.0.1:9002\"\npeer_ttl = \"5s\"\nfetch_ttl = \"2m\"\nmax_parents = 8\n"), 0o644)
	c, err = config.LoadScheduler(p, true)
	if err != nil {
		t.Fatal(err)
	}
	if c.Listen != "127.0.0.1:9002" || c.PeerTTL != 5*time.Second || c.FetchTTL != 2*time.Minute || c.MaxParents != 8 ||
		c.HTTPListen != "127.0.0.1:8080" || c.GCInterval != 30*time.Second {
		t.Fatalf("loaded %+v", c)
	}
	os.WriteFile(p, []byte("peer_tll = \"5s\"\n"), 0o644)
	if _, err := config.LoadScheduler(p, true); err == nil || !strings.Contains(err.Error(), "peer_tll") {
		t.Fatalf("a typo was accepted: %v", err)
	}
	os.WriteFile(p, []byte("fetch_ttl = \"0s\"\nlog_level = \"loud\"\n"), 0o644)
	c, err = config.LoadScheduler(p, true)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "fetch_ttl") || !strings.Contains(err.Error(), "log_level") {
		t.Fatalf("validate: %v", err)
	}
}

func TestBinary(t *testing.T) {
	bin := testenv.Bin(t, "starling-scheduler")
	for _, args := range [][]string{{"version"}, {"--version"}} {
		out, err := exec.Command(bin, args...).CombinedOutput()
		if err != nil || !strings.HasPrefix(string(out), "starling-scheduler ") {
			t.Fatalf("%v: %q %v", args, out, err)
		}
	}

	dir := t.TempDir()
	bad := filepath.Join(dir, "bad.toml")
	os.WriteFile(bad, []byte("listn = \":1\"\n"), 0o644)
	if out, err := exec.Command(bin, "--config", bad).CombinedOutput(); err == nil || !strings.Contains(string(out), "unknown keys: listn") {
		t.Fatalf("a bad configuration: %q %v", out, err)
	}

	grpcAddr := "127.0.0.1:" + testenv.Itoa(testenv.FreePort(t))
	httpAddr := "127.0.0.1:" + testenv.Itoa(testenv.FreePort(t))
	cfg := filepath.Join(dir, "scheduler.toml")
	// The file names the HTTP address and a gRPC one the flag overrides.
	os.WriteFile(cfg, []byte("listen = \"127.0.0.1:1\"\nhttp_listen = \""+httpAddr+"\"\ngc_interval = \"1s\"\n"), 0o644)
	p := testenv.Start(t, "scheduler", nil, bin, "--config", cfg, "--listen", grpcAddr, "--log-level", "debug")
	testenv.WaitTCP(t, p, httpAddr, 30*time.Second)
	testenv.WaitTCP(t, p, grpcAddr, 30*time.Second)

	resp, err := http.Get("http://" + httpAddr + "/healthy")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(b) != "OK" {
		t.Fatalf("/healthy: %d %q", resp.StatusCode, b)
	}

	conn, err := grpc.Dial(grpcAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c := schedulerpb.NewSchedulerClient(conn)
	r, err := c.Announce(ctx, &schedulerpb.AnnounceRequest{Peer: &schedulerpb.PeerInfo{Id: "seed", Ip: "127.0.0.1", UploadPort: 4000, Capacity: 4, Seed: true}})
	if err != nil || !r.GetResync() {
		t.Fatalf("announce: %v %v", r, err)
	}
	resp, err = http.Get("http://" + httpAddr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	b, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{`starling_scheduler_peers{role="seed"} 1`, "go_goroutines", "process_cpu_seconds_total"} {
		if !strings.Contains(string(b), want) {
			t.Fatalf("metrics lack %q", want)
		}
	}

	p.Stop()
	if code := p.Cmd.ProcessState.ExitCode(); code != 0 {
		t.Fatalf("exit code %d after SIGTERM:\n%s", code, p.Log())
	}
	if log := p.Log(); !strings.Contains(log, "shutting down") || !strings.Contains(log, "peer joined") {
		t.Fatalf("log:\n%s", log)
	}
}
