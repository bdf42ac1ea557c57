package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/starling-dev/starling/pkg/blob"
	"github.com/starling-dev/starling/pkg/layer"
)

func TestStatus(t *testing.T) {
	want := layer.Status{Mount: "/var/lib/starling/lazy/mnt", ReadMode: "passthrough", Layers: []layer.LayerStatus{
		{Digest: "sha256:" + strings.Repeat("a", 64), Mountpoint: "/snap/1/fs", Entries: 12, Stats: blob.Stats{FetchRequests: 3, FetchedBytes: 4096, CacheHits: 7,
			Sources: map[string]blob.SourceCount{"cache": {Bytes: 3 << 20}, "local": {}, "peer": {Bytes: 2048, WaitSeconds: 0.25}, "origin": {Bytes: 5 << 20, WaitSeconds: 1.5}}}},
	}}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/status" {
			http.NotFound(w, r)
			return
		}
		_ = json.NewEncoder(w).Encode(want)
	}))
	defer srv.Close()
	got, err := fetchStatus(context.Background(), strings.TrimPrefix(srv.URL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	printStatus(&out, got)
	if got.Layers[0].Stats.Sources["origin"].WaitSeconds != 1.5 {
		t.Fatalf("sources lost on the way: %+v", got.Layers[0].Stats.Sources)
	}
	for _, s := range []string{"passthrough", "sha256:aaaaaaaaaaa", "4096", "/snap/1/fs", "3.0MiB", "2.0KiB/250ms", "5.0MiB/1.5s", "ORIGIN"} {
		if !strings.Contains(out.String(), s) {
			t.Fatalf("%q missing from:\n%s", s, out.String())
		}
	}
	if _, err := fetchStatus(context.Background(), srv.URL+"/nothing"); err == nil || !strings.Contains(err.Error(), "404") {
		t.Fatalf("a missing endpoint: %v", err)
	}
}
