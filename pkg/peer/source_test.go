package peer

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// No credential goes to the scheduler with a task (issue 11, finding 2):
// not the client's Authorization, cookies or proxy credentials, not a
// password in the URL.
func TestWorkCarriesNoCredentials(t *testing.T) {
	r := Request{TaskID: "t", URL: "https://user:secret@registry.example.com/v2/x/blobs/sha256:00", Digest: "sha256:00",
		Header: http.Header{
			"Authorization":       {"Bearer secret"},
			"Cookie":              {"session=secret"},
			"Proxy-Authorization": {"Basic secret"},
			"X-Registry-Auth":     {"secret"},
			"Metadata-Flavor":     {"Google"},
			"Accept":              {"application/octet-stream"},
		}}
	w := workOf(r)
	if strings.Contains(w.String(), "secret") {
		t.Fatalf("work carries a credential: %v", w)
	}
	if w.GetUrl() != "https://registry.example.com/v2/x/blobs/sha256:00" {
		t.Errorf("URL %q", w.GetUrl())
	}
	if len(w.GetHeader()) != 1 || w.GetHeader()["Accept"].GetValues()[0] != "application/octet-stream" {
		t.Errorf("headers %v, want Accept only", w.GetHeader())
	}
	r.Lazy = true
	if w := workOf(r); w.GetUrl() != "" || len(w.GetHeader()) != 0 {
		t.Errorf("lazy work %v, want no URL and no headers", w)
	}
}

// An origin's 401 is answered once with the node's own credentials (a
// seed doing work that came without any), which later requests keep.
func TestHTTPSourceAuthorizer(t *testing.T) {
	data := []byte("0123456789")
	var refused, asked atomic.Int32
	origin := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer node" {
			refused.Add(1)
			w.Header().Set("WWW-Authenticate", `Bearer realm="x"`)
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		http.ServeContent(w, r, "", time.Time{}, strings.NewReader(string(data)))
	}))
	defer origin.Close()
	auth := func(_ context.Context, url string) (string, error) {
		asked.Add(1)
		if url != origin.URL+"/blob" {
			t.Errorf("authorizer asked for %s", url)
		}
		return "Bearer node", nil
	}
	src := HTTPSource(origin.Client(), origin.URL+"/blob", http.Header{"Authorization": {"Bearer client-expired"}}, WithAuthorizer(auth))
	ctx := context.Background()
	n, err := src.Size(ctx)
	if err != nil || n != int64(len(data)) {
		t.Fatalf("size %d, %v", n, err)
	}
	rc, err := src.Fetch(ctx, 2, 5)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(rc)
	rc.Close()
	if string(b) != "23456" {
		t.Fatalf("fetched %q", b)
	}
	if refused.Load() != 1 || asked.Load() != 1 {
		t.Errorf("origin refused %d requests, authorizer asked %d times; want 1 and 1", refused.Load(), asked.Load())
	}

	// Without an authorizer, or when it has nothing better, the 401 stands.
	for _, o := range []SourceOption{nil, WithAuthorizer(func(context.Context, string) (string, error) { return "", nil })} {
		var opts []SourceOption
		if o != nil {
			opts = append(opts, o)
		}
		src := HTTPSource(origin.Client(), origin.URL+"/blob", nil, opts...)
		_, err := src.Size(ctx)
		oe, ok := err.(*OriginError)
		if !ok || oe.StatusCode != http.StatusUnauthorized {
			t.Errorf("size without credentials: %v, want the origin's 401", err)
		}
	}
}
