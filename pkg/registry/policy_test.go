package registry

import (
	"net/http"
	"testing"
)

func TestEndpointRules(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Host = map[string]HostConfig{
		"reg.internal:5000": {Insecure: true, Header: http.Header{"X-A": {"1"}}},
		"tls.internal":      {SkipVerify: true},
		"docker.io": {Mirrors: []Mirror{
			{Host: "mirror.internal", SkipVerify: true, Header: http.Header{"X-M": {"m"}}},
			{Host: "reg.internal:5000"},
		}},
	}
	for _, c := range []struct {
		host              string
		plain, skipVerify bool
	}{
		{"localhost:5000", true, false},
		{"127.0.0.1:5000", true, false},
		{"[::1]:5000", true, false},
		{"reg.internal:5000", true, false},
		{"tls.internal", false, true},
		{"mirror.internal", false, true}, // known only as a mirror
		{"10.0.0.5:5000", false, false},  // private, but not configured
		{"index.docker.io", false, false},
	} {
		e := cfg.Endpoint(c.host)
		if e.PlainHTTP != c.plain || e.SkipVerify != c.skipVerify {
			t.Errorf("%s: plain %v skip_verify %v, want %v %v", c.host, e.PlainHTTP, e.SkipVerify, c.plain, c.skipVerify)
		}
		if got, want := e.TLSConfig().InsecureSkipVerify, c.skipVerify; got != want {
			t.Errorf("%s: TLS InsecureSkipVerify %v", c.host, got)
		}
	}
	if s := cfg.Endpoint("reg.internal:5000").Scheme(); s != "http" {
		t.Errorf("insecure host scheme %s", s)
	}

	// Docker Hub's three names share the entry written as docker.io.
	for _, h := range []string{"docker.io", "index.docker.io", "registry-1.docker.io"} {
		hp := cfg.HostPolicy(h)
		if len(hp.Mirrors) != 2 || hp.Mirrors[0].Host != "mirror.internal" || !hp.Mirrors[0].SkipVerify ||
			hp.Mirrors[0].Header.Get("X-M") != "m" || !hp.Mirrors[1].PlainHTTP || hp.Mirrors[1].Header != nil {
			t.Errorf("%s: mirrors %+v", h, hp.Mirrors)
		}
	}

	cfg.PlainHTTP = true
	if !cfg.Endpoint("10.0.0.5:5000").PlainHTTP {
		t.Error("--plain-http must reach every host over HTTP")
	}
}
