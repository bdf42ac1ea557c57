package dockerhosts

import (
	"context"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/remotes/docker"
	"github.com/google/go-containerregistry/pkg/authn"
	ggcrregistry "github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/random"

	"github.com/starling-dev/starling/pkg/registry"
)

// serveRegistry starts an in-memory registry on a non-loopback address of
// this host (loopback hosts are plain HTTP whatever the configuration
// says), over TLS or not, holding one image at app:1.
func serveRegistry(t *testing.T, tls bool) string {
	t.Helper()
	ip := nonLoopbackIP(t)
	l, err := net.Listen("tcp", net.JoinHostPort(ip, "0"))
	if err != nil {
		t.Skipf("listen on %s: %v", ip, err)
	}
	srv := httptest.NewUnstartedServer(ggcrregistry.New(ggcrregistry.Logger(log.New(io.Discard, "", 0))))
	srv.Listener.Close()
	srv.Listener = l
	if tls {
		srv.StartTLS()
	} else {
		srv.Start()
	}
	t.Cleanup(srv.Close)
	host := l.Addr().String()

	// Pushed with starling's own client, configured as the resolver will be.
	cfg := registry.DefaultConfig()
	cfg.Host = map[string]registry.HostConfig{host: {Insecure: !tls, SkipVerify: tls}}
	c := registry.New(cfg, registry.WithKeychain(authn.NewMultiKeychain()))
	ref, err := c.ParseReference(host + "/app:1")
	if err != nil {
		t.Fatal(err)
	}
	img, err := random.Image(1024, 1)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := c.Write(ctx, ref, img); err != nil {
		t.Fatalf("push to %s: %v", host, err)
	}
	return host
}

func nonLoopbackIP(t *testing.T) string {
	t.Helper()
	addrs, _ := net.InterfaceAddrs()
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok && !n.IP.IsLoopback() && n.IP.To4() != nil {
			return n.IP.String()
		}
	}
	t.Skip("no non-loopback IPv4 address to serve a registry on")
	return ""
}

func resolve(cfg registry.Config, ref string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	_, _, err := Resolver(cfg, authn.NewMultiKeychain()).Resolve(ctx, ref)
	return err
}

func config(host string, hc registry.HostConfig) registry.Config {
	cfg := registry.DefaultConfig()
	cfg.Retries = 0
	cfg.Host = map[string]registry.HostConfig{host: hc}
	return cfg
}

func TestResolverHonoursSkipVerify(t *testing.T) {
	host := serveRegistry(t, true)
	ref := host + "/app:1"
	if err := resolve(config(host, registry.HostConfig{SkipVerify: true}), ref); err != nil {
		t.Fatalf("skip_verify: %v", err)
	}
	err := resolve(config(host, registry.HostConfig{}), ref)
	if err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("without skip_verify a self-signed registry must be refused; err = %v", err)
	}
}

func TestResolverHonoursPlainHTTP(t *testing.T) {
	host := serveRegistry(t, false)
	ref := host + "/app:1"
	if err := resolve(config(host, registry.HostConfig{Insecure: true}), ref); err != nil {
		t.Fatalf("insecure: %v", err)
	}
	all := config("other.example", registry.HostConfig{})
	all.PlainHTTP = true // --plain-http
	if err := resolve(all, ref); err != nil {
		t.Fatalf("--plain-http: %v", err)
	}
	if err := resolve(config(host, registry.HostConfig{}), ref); err == nil {
		t.Fatal("a registry not marked insecure was reached over plain HTTP")
	}
}

func TestHostsMirrorsFirst(t *testing.T) {
	cfg := registry.DefaultConfig()
	cfg.Host = map[string]registry.HostConfig{
		"docker.io": {Header: http.Header{"X-Origin": {"1"}}, Mirrors: []registry.Mirror{
			{Host: "127.0.0.1:4001", Header: http.Header{"X-Dragonfly-Registry": {"https://index.docker.io"}}},
			{Host: "mirror.example", SkipVerify: true},
			{Host: "plain.example:5000", Insecure: true},
		}},
	}
	hosts, err := Hosts(cfg, nil)("docker.io")
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, h := range hosts {
		got = append(got, h.Scheme+"://"+h.Host)
	}
	want := "http://127.0.0.1:4001 https://mirror.example http://plain.example:5000 https://registry-1.docker.io"
	if strings.Join(got, " ") != want {
		t.Fatalf("hosts %v, want %s", got, want)
	}
	if hosts[0].Header.Get("X-Dragonfly-Registry") == "" || hosts[3].Header.Get("X-Origin") != "1" {
		t.Errorf("headers: mirror %v, origin %v", hosts[0].Header, hosts[3].Header)
	}
	if hosts[0].Capabilities.Has(docker.HostCapabilityPush) || !hosts[3].Capabilities.Has(docker.HostCapabilityPush) {
		t.Errorf("capabilities: mirrors must not be pushed to")
	}
}
