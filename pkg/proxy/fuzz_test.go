package proxy

import (
	"bufio"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
)

// FuzzParseRange: any Range header and blob size parse without panic into
// ranges inside the blob, at most maxRanges, adding up to no more than it.
func FuzzParseRange(f *testing.F) {
	for _, s := range []string{"bytes=0-99", "bytes=-100", "bytes=100-", "bytes=0-0,5-9,-1", "bytes= 1 - 2 ,, 3-", "items=0-1",
		"bytes=9223372036854775807-", "bytes=-9223372036854775807", "bytes=5-4", "bytes=" + strings.Repeat("0-0,", 1100)} {
		f.Add(s, int64(1000))
	}
	f.Fuzz(func(t *testing.T, spec string, size int64) {
		if size < 0 {
			size = -(size + 1)
		}
		rs, err := parseRanges(spec, size)
		if err != nil {
			if rs != nil {
				t.Fatalf("ranges %v with error %v", rs, err)
			}
			return
		}
		if len(rs) == 0 || len(rs) > maxRanges {
			t.Fatalf("%d ranges", len(rs))
		}
		var total int64
		for _, r := range rs {
			if r.off < 0 || r.n <= 0 || r.off >= size || r.n > size-r.off {
				t.Fatalf("range %+v outside a blob of %d bytes (spec %q)", r, size, spec)
			}
			total += r.n
		}
		if total > size {
			t.Fatalf("ranges add up to %d of a %d-byte blob", total, size)
		}
	})
}

// recordingTransport answers every request 200 and records where it went.
type recordingTransport struct {
	mu    sync.Mutex
	hosts []string
}

func (rt *recordingTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	rt.mu.Lock()
	rt.hosts = append(rt.hosts, r.URL.Scheme+"://"+r.URL.Host)
	rt.mu.Unlock()
	return &http.Response{StatusCode: 200, Header: http.Header{}, Body: io.NopCloser(strings.NewReader("")), Request: r}, nil
}

// FuzzProxyRequest: whatever request a client sends (proxy form, mirror
// form with X-Dragonfly-Registry or ns, CONNECT), the proxy never panics
// and never sends anything anywhere but the allowed registries.
func FuzzProxyRequest(f *testing.F) {
	for _, s := range []string{
		"GET /v2/lib/x/blobs/sha256:0000000000000000000000000000000000000000000000000000000000000000 HTTP/1.1\r\nHost: p\r\n\r\n",
		"GET http://127.0.0.1:8080/latest HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
		"GET /v2/ HTTP/1.1\r\nHost: p\r\nX-Dragonfly-Registry: http://169.254.169.254\r\n\r\n",
		"GET /v2/?ns=localhost:5000 HTTP/1.1\r\nHost: p\r\n\r\n",
		"GET /v2/?ns=registry.example.com HTTP/1.1\r\nHost: p\r\nX-Dragonfly-Use-P2P: true\r\n\r\n",
		"GET https://user:pw@registry.example.com/v2/ HTTP/1.1\r\nHost: registry.example.com\r\n\r\n",
		"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n",
		"GET /v2/ HTTP/1.1\r\nHost: p\r\nX-Dragonfly-Registry: https://registry.example.com.evil.com\r\n\r\n",
		"GET //evil.com/v2/ HTTP/1.1\r\nHost: p\r\n\r\n",
	} {
		f.Add(s)
	}
	rt := &recordingTransport{}
	x, err := New(Options{Allowed: []string{"registry.example.com"}, DefaultRegistry: "https://registry.example.com",
		Transport: rt, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}, nil)
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		r, err := http.ReadRequest(bufio.NewReader(strings.NewReader(raw)))
		if err != nil {
			return
		}
		r.RemoteAddr = "192.0.2.1:1234"
		rt.mu.Lock()
		rt.hosts = rt.hosts[:0]
		rt.mu.Unlock()
		func() {
			defer func() {
				// A response cut off on purpose is not a crash.
				if p := recover(); p != nil && p != http.ErrAbortHandler {
					t.Fatalf("panic: %v", p)
				}
			}()
			x.ServeHTTP(httptest.NewRecorder(), r)
		}()
		rt.mu.Lock()
		defer rt.mu.Unlock()
		for _, h := range rt.hosts {
			switch strings.ToLower(h) {
			case "https://registry.example.com", "http://registry.example.com",
				"https://registry.example.com:443", "http://registry.example.com:80",
				"https://registry.example.com:80", "http://registry.example.com:443":
			default:
				t.Fatalf("request %q went to %s", raw, h)
			}
		}
	})
}
