package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/starling-dev/starling/api/schedulerpb"
	"github.com/starling-dev/starling/internal/testenv"
	"github.com/starling-dev/starling/pkg/cluster"
	"github.com/starling-dev/starling/pkg/config"
)

func issue(t *testing.T, dir, name string, roles ...string) config.Cluster {
	t.Helper()
	is, err := cluster.Issue(dir, name, cluster.IssueOptions{Roles: roles, Out: filepath.Join(dir, "nodes")})
	if err != nil {
		t.Fatal(err)
	}
	return config.Cluster{CA: is.CA, Cert: is.Cert, Key: is.Key}
}

func load(t *testing.T, c config.Cluster) *cluster.Cluster {
	t.Helper()
	cl, err := cluster.Load(c)
	if err != nil {
		t.Fatal(err)
	}
	return cl
}

// With [cluster] set, the gRPC API and the HTTP API (but health and
// metrics) want a certificate of the cluster CA.
func TestSchedulerMutualTLS(t *testing.T) {
	dir := t.TempDir()
	if _, _, err := cluster.Init(dir); err != nil {
		t.Fatal(err)
	}
	cfg := config.DefaultScheduler()
	cfg.Listen = "127.0.0.1:" + testenv.Itoa(testenv.FreePort(t))
	cfg.HTTPListen = "127.0.0.1:" + testenv.Itoa(testenv.FreePort(t))
	cfg.LogLevel = "error"

	// A certificate without the scheduler role is refused at start.
	cfg.Cluster = issue(t, dir, "notsched")
	if err := run(context.Background(), cfg); err == nil || !strings.Contains(err.Error(), "no scheduler") {
		t.Fatalf("a peer certificate for the scheduler: %v", err)
	}
	cfg.Cluster = issue(t, dir, "sched", cluster.RoleScheduler)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- run(ctx, cfg) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	testenv.WaitFor(t, 10*time.Second, "scheduler listening", func() bool {
		c, err := net.Dial("tcp", cfg.HTTPListen)
		if err == nil {
			c.Close()
		}
		return err == nil
	})

	peerC := load(t, issue(t, dir, "p1"))
	client := load(t, issue(t, dir, "ops", cluster.RoleClient))
	anon := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}, DisableKeepAlives: true}}
	member := &http.Client{Transport: &http.Transport{DisableKeepAlives: true,
		DialTLSContext: cluster.DialTLS(client.ClientTLS(cluster.RoleScheduler), &net.Dialer{})}}
	base := "https://" + cfg.HTTPListen
	for _, c := range []struct {
		name   string
		client *http.Client
		method string
		path   string
		want   int
	}{
		{"anon health", anon, "GET", "/healthy", 200},
		{"anon metrics", anon, "GET", "/metrics", 200},
		{"anon preheat", anon, "POST", "/api/v1/preheat", 401},
		{"anon tasks", anon, "GET", "/api/v1/tasks/sha256:00", 401},
		{"member tasks", member, "GET", "/api/v1/tasks/nosuch", 0},
	} {
		req, _ := http.NewRequest(c.method, base+c.path, bytes.NewReader([]byte(`{"url":"http://169.254.169.254/"}`)))
		resp, err := c.client.Do(req)
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		resp.Body.Close()
		if (c.want != 0 && resp.StatusCode != c.want) || (c.want == 0 && resp.StatusCode == http.StatusUnauthorized) {
			t.Errorf("%s: %d, want %d", c.name, resp.StatusCode, c.want)
		}
	}
	if resp, err := http.Get("http://" + cfg.HTTPListen + "/api/v1/tasks/x"); err == nil && resp.StatusCode < 400 {
		t.Errorf("plaintext HTTP API answered %s", resp.Status)
	}

	announce := func(opt grpc.DialOption, id string) error {
		conn, err := grpc.Dial(cfg.Listen, opt)
		if err != nil {
			return err
		}
		defer conn.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		_, err = schedulerpb.NewSchedulerClient(conn).Announce(ctx, &schedulerpb.AnnounceRequest{
			Peer: &schedulerpb.PeerInfo{Id: id, Ip: "127.0.0.1", UploadPort: 4000, Capacity: 4}})
		return err
	}
	if err := announce(grpc.WithTransportCredentials(insecure.NewCredentials()), "p1"); err == nil {
		t.Error("a plaintext announce was accepted")
	}
	if err := announce(grpc.WithTransportCredentials(cluster.Credentials(client.ClientTLS(cluster.RoleScheduler))), "ops"); err == nil {
		t.Error("a client certificate announced")
	}
	if err := announce(grpc.WithTransportCredentials(cluster.Credentials(peerC.ClientTLS(cluster.RoleScheduler))), "p1"); err != nil {
		t.Errorf("a peer's announce: %v", err)
	}
}

// Without TLS, listening beyond loopback needs insecure.
func TestSchedulerRefusesOpenPlaintext(t *testing.T) {
	cfg := config.DefaultScheduler()
	cfg.Listen = ":" + testenv.Itoa(testenv.FreePort(t))
	cfg.HTTPListen = ""
	cfg.LogLevel = "error"
	if err := run(context.Background(), cfg); err == nil || !strings.Contains(err.Error(), "insecure") {
		t.Fatalf("plaintext on every interface: %v", err)
	}
}
