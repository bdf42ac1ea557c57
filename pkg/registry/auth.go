package registry

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"sync"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
)

// Authorization returns the Authorization header a pull of repo sends to
// its registry ("" when the registry wants none), obtained through
// go-containerregistry's token flow with the client's keychain and
// transport. It lets another process (a seed peer asked to preheat) read
// what the local credentials may read, without the credentials themselves.
func (c *Client) Authorization(ctx context.Context, repo name.Repository) (string, error) {
	auth, err := c.keychain.Resolve(repo.Registry)
	if err != nil {
		return "", fmt.Errorf("credentials for %s: %w", repo.RegistryStr(), err)
	}
	capt := &authCapture{inner: c.base, host: repo.RegistryStr()}
	rt, err := transport.NewWithContext(ctx, repo.Registry, auth, capt, []string{repo.Scope(transport.PullScope)})
	if err != nil {
		return "", fmt.Errorf("authenticate to %s: %w", repo.RegistryStr(), err)
	}
	// Any request to the registry carries the header; the ping to /v2/
	// answers whatever the repository holds.
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, repo.Scheme()+"://"+repo.RegistryStr()+"/v2/", nil)
	if err != nil {
		return "", err
	}
	resp, err := rt.RoundTrip(req)
	if err != nil {
		return "", fmt.Errorf("authenticate to %s: %w", repo.RegistryStr(), err)
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 4096))
	resp.Body.Close()
	capt.mu.Lock()
	defer capt.mu.Unlock()
	return capt.auth, nil
}

// authCapture remembers the Authorization header sent to one host.
type authCapture struct {
	inner http.RoundTripper
	host  string
	mu    sync.Mutex
	auth  string
}

func (a *authCapture) RoundTrip(r *http.Request) (*http.Response, error) {
	if r.URL.Host == a.host {
		if v := r.Header.Get("Authorization"); v != "" {
			a.mu.Lock()
			a.auth = v
			a.mu.Unlock()
		}
	}
	return a.inner.RoundTrip(r)
}
