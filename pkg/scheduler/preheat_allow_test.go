package scheduler

import (
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// The SSRF of issue 11 finding 1: a preheat of an internal address (the
// metadata service, loopback) or of a host outside the allowlist is
// refused with 403 and nothing is queued; an allowed one reaches the seed
// without the asker's headers.
func TestHTTPPreheatAllowlist(t *testing.T) {
	for _, c := range []struct {
		allowed []string
		url     string
		want    int
	}{
		{nil, "http://169.254.169.254/computeMetadata/v1/instance/", http.StatusForbidden},
		{nil, "http://127.0.0.1:8080/x", http.StatusForbidden},
		{nil, "http://localhost/x", http.StatusForbidden},
		{nil, "http://metadata.google.internal/computeMetadata/v1/", http.StatusForbidden},
		{nil, "http://[::1]/x", http.StatusForbidden},
		{nil, "http://[fd00:ec2::254]/latest/meta-data/", http.StatusForbidden},
		{nil, "http://100.100.100.200/latest/meta-data/", http.StatusForbidden},
		{nil, "file:///etc/passwd", http.StatusForbidden},
		{nil, "http://user:pw@registry.example.com/v2/x/blobs/sha256:00", http.StatusForbidden},
		{nil, "https://registry.example.com:5000/v2/x", http.StatusForbidden},
		{nil, "https://registry.example.com/v2/x", http.StatusOK},
		{[]string{"registry.example.com"}, "https://other.example.com/v2/x", http.StatusForbidden},
		{[]string{"*.example.com"}, "https://other.example.com/v2/x", http.StatusOK},
		{[]string{"*.example.com"}, "https://127.0.0.1/v2/x", http.StatusForbidden},
		{[]string{"127.0.0.1:5000"}, "http://127.0.0.1:5000/v2/x", http.StatusOK},
	} {
		srv, err := NewServer(New(Options{StartGrace: -1}), ServerOptions{Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), PreheatAllowed: c.allowed})
		if err != nil {
			t.Fatal(err)
		}
		srv.s.Announce(Peer{ID: "seed", Seed: true, IP: "10.0.0.9", UploadPort: 4000, Capacity: 4})
		hs := httptest.NewServer(srv.HTTPHandler())
		body := `{"tasks":[{"task_id":"t1","url":"` + c.url + `","header":{"Metadata-Flavor":["Google"],"Authorization":["Bearer secret"],"Accept":["*/*"]}}]}`
		resp, err := http.Post(hs.URL+"/api/v1/preheat", "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != c.want {
			t.Errorf("allowed %v, preheat %s: %d %s, want %d", c.allowed, c.url, resp.StatusCode, b, c.want)
		}
		work := srv.s.TakeWork("seed")
		switch {
		case c.want != http.StatusOK && len(work) != 0:
			t.Errorf("preheat %s refused but work queued: %v", c.url, work)
		case c.want == http.StatusOK && (len(work) != 1 || len(work[0].Header) != 1 || work[0].Header["Accept"] == nil):
			t.Errorf("preheat %s: work %+v, want one task with only Accept", c.url, work)
		}
		hs.Close()
	}
}
