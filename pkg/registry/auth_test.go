package registry

import (
	"context"
	"encoding/json"
	"net/http"
	"testing"

	"github.com/google/go-containerregistry/pkg/authn"
)

func TestAuthorizationCapturesToken(t *testing.T) {
	_, srv := newFake(t, []byte("x"))
	f := srv.Config.Handler.(*fakeBlobServer)
	f.handle = func(w http.ResponseWriter, r *http.Request) bool {
		if r.URL.Path == "/token" {
			if u, p, ok := r.BasicAuth(); !ok || u != "alice" || p != "pw" {
				w.WriteHeader(http.StatusUnauthorized)
				return true
			}
			_ = json.NewEncoder(w).Encode(map[string]string{"token": "tok"})
			return true
		}
		if r.Header.Get("Authorization") != "Bearer tok" {
			w.Header().Set("WWW-Authenticate", `Bearer realm="`+srv.URL+`/token",service="fake"`)
			w.WriteHeader(http.StatusUnauthorized)
			return true
		}
		return false
	}
	kc := staticKeychain{authn.FromConfig(authn.AuthConfig{Username: "alice", Password: "pw"})}
	c := New(DefaultConfig(), WithKeychain(kc))
	repo, _ := c.ParseRepository(host(srv) + "/x")
	a, err := c.Authorization(context.Background(), repo)
	if err != nil || a != "Bearer tok" {
		t.Fatalf("Authorization = %q, %v", a, err)
	}

	// A registry that wants no credentials: no header.
	f.handle = nil
	a, err = anonClient(DefaultConfig()).Authorization(context.Background(), repo)
	if err != nil || a != "" {
		t.Fatalf("anonymous registry: %q, %v", a, err)
	}
}
