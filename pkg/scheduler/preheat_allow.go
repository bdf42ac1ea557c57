package scheduler

import (
	"fmt"
	"net/http"
	"net/url"

	"github.com/starling-dev/starling/pkg/allow"
)

// defaultPreheatAllowed admits any host on ports 80 and 443 when the
// configuration names no registry: the literal internal addresses and
// names (loopback, link-local, metadata) a wildcard never admits are what
// an attacker's preheat reached (issue 11, finding 1). A seed checks the
// address again when it dials (allow.List.DialContext), which also stops
// a public name that resolves to an internal address.
var defaultPreheatAllowed = []string{"*"}

func newPreheatAllow(patterns []string) (*allow.List, error) {
	if len(patterns) == 0 {
		patterns = defaultPreheatAllowed
	}
	l, err := allow.New(patterns)
	if err != nil {
		return nil, fmt.Errorf("preheat allowed registries: %w", err)
	}
	return l, nil
}

// preheatHeaders are the only headers of a preheat request that go to the
// seed: nothing that carries a credential or changes what an internal
// service answers (Metadata-Flavor). The seed fetches with its own
// node's credentials.
var preheatHeaders = []string{"Accept"}

// checkPreheatTask refuses a preheat task whose URL the allowlist does not
// admit and keeps only the headers a seed may send.
func (srv *Server) checkPreheatTask(t *PreheatTask) error {
	u, err := url.Parse(t.URL)
	if err != nil {
		return &allow.RefusedError{Target: "(unparsable URL)", Reason: "not a URL"}
	}
	if err := srv.preheatAllow.CheckURL(u); err != nil {
		return err
	}
	var h map[string][]string
	for _, k := range preheatHeaders {
		if vs := http.Header(t.Header).Values(k); len(vs) > 0 {
			if h == nil {
				h = map[string][]string{}
			}
			h[k] = append([]string(nil), vs...)
		}
	}
	t.Header = h
	return nil
}
