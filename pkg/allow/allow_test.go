package allow

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"testing"
)

func TestCheckURL(t *testing.T) {
	l, err := New([]string{"registry.example.com", "mirror.example.com:5000", "*.corp", "127.0.0.1:*", "docker.io", "https://ghcr.io"})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		url string
		ok  bool
	}{
		{"https://registry.example.com/v2/", true},
		{"http://registry.example.com/v2/", true},
		{"https://REGISTRY.example.com./v2/", true},
		{"https://registry.example.com:443/v2/", true},
		{"https://registry.example.com:5000/v2/", false},
		{"https://mirror.example.com:5000/v2/", true},
		{"https://mirror.example.com/v2/", false},
		{"https://a.b.corp/v2/", true},
		{"https://corp/v2/", false},
		{"https://evilcorp/v2/", false},
		{"https://registry.example.com.evil.net/v2/", false},
		{"http://127.0.0.1:5000/v2/", true},
		{"http://127.0.0.1/v2/", true},
		{"http://localhost:5000/v2/", false},
		{"https://registry-1.docker.io/v2/", true},
		{"https://index.docker.io/v2/", true},
		{"https://ghcr.io/v2/", true},
		{"https://user:pw@registry.example.com/v2/", false},
		{"ftp://registry.example.com/", false},
		{"file:///etc/passwd", false},
		{"https://169.254.169.254/", false},
	} {
		u, err := url.Parse(c.url)
		if err != nil {
			t.Fatal(err)
		}
		err = l.CheckURL(u)
		var re *RefusedError
		if (err == nil) != c.ok || (err != nil && !errors.As(err, &re)) {
			t.Errorf("%s: %v, want allowed %v", c.url, err, c.ok)
		}
	}
	// A wildcard never admits an internal address or name.
	w, _ := New([]string{"*", "*.internal", "*:*"})
	for _, s := range []string{"http://127.0.0.1/", "http://[::1]/", "http://169.254.169.254/", "http://[fd00:ec2::254]/",
		"http://100.100.100.200/", "http://0.0.0.0/", "http://[::ffff:127.0.0.1]/", "http://[64:ff9b::a9fe:a9fe]/",
		"http://localhost/", "http://metadata.google.internal/", "http://x.localhost/", "http://[fe80::1%25eth0]/"} {
		u, _ := url.Parse(s)
		if err := w.CheckURL(u); err == nil {
			t.Errorf("%s admitted by a wildcard", s)
		}
	}
	for _, bad := range []string{"", "a/b", "*foo.com", "foo.*.com", "host:99999", "host:x"} {
		if _, err := New([]string{bad}); err == nil {
			t.Errorf("pattern %q accepted", bad)
		}
	}
}

func TestInternal(t *testing.T) {
	for _, s := range []string{"127.0.0.1", "127.1.2.3", "::1", "169.254.169.254", "fe80::1", "0.0.0.0", "::", "224.0.0.1",
		"fd00:ec2::254", "100.100.100.200", "168.63.129.16", "::ffff:169.254.169.254", "64:ff9b::7f00:1"} {
		if !internal(netip.MustParseAddr(s)) {
			t.Errorf("%s not internal", s)
		}
	}
	for _, s := range []string{"10.0.0.1", "192.168.1.1", "172.16.0.1", "8.8.8.8", "2001:db8::1", "100.64.0.1"} {
		if internal(netip.MustParseAddr(s)) {
			t.Errorf("%s internal", s)
		}
	}
}

// The dial-time check: an address a wildcard admits by name is refused
// once it is loopback; a host named exactly reaches it.
func TestDialContext(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) {}))
	defer srv.Close()
	addr := srv.Listener.Addr().String()
	_, port, _ := net.SplitHostPort(addr)
	ctx := context.Background()

	w, _ := New([]string{"*:*"})
	for _, a := range []string{addr, "localhost:" + port, "[::1]:" + port} {
		_, err := w.DialContext(ctx, "tcp", a)
		var re *RefusedError
		if !errors.As(err, &re) {
			t.Errorf("dial %s through a wildcard: %v, want refused", a, err)
		}
	}
	// Through an http.Client, as the proxy's transports use it.
	c := &http.Client{Transport: &http.Transport{DialContext: w.DialContext}}
	_, err := c.Get(srv.URL)
	var re *RefusedError
	if !errors.As(err, &re) {
		t.Errorf("GET through a refusing dialer: %v", err)
	}

	exact, _ := New([]string{"127.0.0.1:" + port})
	conn, err := exact.DialContext(ctx, "tcp", addr)
	if err != nil {
		t.Fatalf("dial an exactly named host: %v", err)
	}
	conn.Close()
}
