package proxy

import (
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/starling-dev/starling/pkg/peer"
)

// authChecker asks the origin whether a client may read what the proxy is
// about to serve from the P2P network or the node's storage, which holds
// bytes other clients fetched with their own credentials. The question is
// the client's own request without a body: a HEAD of the blob (a ranged
// GET of one byte for other URLs, whose signatures may be bound to GET),
// with the client's Authorization and Cookie and nothing else. Answers are
// kept per (credentials, repository) for ttl; a repository that answers an
// anonymous HEAD is public for everyone for ttl. A refusal is kept briefly
// (an attacker's retries cost the origin nothing), a failure not at all.
type authChecker struct {
	client *http.Client
	ttl    time.Duration
	negTTL time.Duration
	now    func() time.Time

	mu     sync.Mutex
	public map[string]time.Time // scope -> until
	m      map[authKey]*authEntry
}

type authKey struct {
	cred  [32]byte
	scope string
}

type authEntry struct {
	ready  chan struct{} // closed once the answer below is set
	until  time.Time
	status int // the origin's answer; 0: the check failed
	header http.Header
	length int64
	err    error
}

// maxAuthEntries bounds the answers kept: each costs the origin one
// request, so only a client cycling through tokens fills it.
const maxAuthEntries = 1 << 16

func newAuthChecker(rt http.RoundTripper, ttl time.Duration) *authChecker {
	if ttl <= 0 {
		ttl = time.Minute
	}
	return &authChecker{
		client: &http.Client{Transport: rt, Timeout: 30 * time.Second},
		ttl:    ttl, negTTL: min(ttl, 10*time.Second), now: time.Now,
		public: map[string]time.Time{}, m: map[authKey]*authEntry{},
	}
}

// registryScope is what one set of registry credentials opens: a
// repository of a registry host.
func registryScope(u *url.URL, digest string) string {
	repo := strings.TrimSuffix(strings.TrimPrefix(u.Path, "/v2/"), "/blobs/"+digest)
	return canonicalHost(u) + "/" + repo
}

// credHash names a client's credentials without keeping them.
func credHash(h http.Header) [32]byte {
	a, c := h.Values("Authorization"), h.Values("Cookie")
	if len(a) == 0 && len(c) == 0 {
		return [32]byte{}
	}
	return sha256.Sum256([]byte(strings.Join(a, "\x00") + "\x01" + strings.Join(c, "\x00")))
}

// check returns nil when the client whose headers are in may read u; the
// origin's refusal as a *peer.OriginError; any other error when the origin
// could not be asked (the caller serves nothing). length is the blob's
// length when the origin said it now (-1 otherwise).
func (c *authChecker) check(ctx context.Context, u *url.URL, in http.Header, digest string) (length int64, result string, err error) {
	scope := u.String()
	if digest != "" {
		scope = registryScope(u, digest)
	}
	now := c.now()
	key := authKey{cred: credHash(in), scope: scope}
	c.mu.Lock()
	if digest != "" && now.Before(c.public[scope]) {
		c.mu.Unlock()
		return -1, "cached", nil
	}
	e := c.m[key]
	if e != nil {
		select {
		case <-e.ready:
			if !now.Before(e.until) {
				e = nil
			}
		default:
		}
	}
	if e != nil {
		c.mu.Unlock()
		select {
		case <-e.ready:
		case <-ctx.Done():
			return -1, "failed", ctx.Err()
		}
		if e.err != nil {
			// Another request's check failed: this one asks again.
			return c.check(ctx, u, in, digest)
		}
		return -1, "cached", e.answer(u)
	}
	e = &authEntry{ready: make(chan struct{})}
	c.pruneLocked(now)
	c.m[key] = e
	c.mu.Unlock()

	e.status, e.header, e.length, e.err = c.ask(ctx, u, in, digest != "")
	c.mu.Lock()
	switch {
	case e.err != nil:
		delete(c.m, key)
	case e.status == http.StatusOK:
		e.until = now.Add(c.ttl)
		if key.cred == ([32]byte{}) && digest != "" {
			c.public[scope] = e.until
		}
	case e.status == http.StatusUnauthorized || e.status == http.StatusForbidden || e.status == http.StatusNotFound:
		e.until = now.Add(c.negTTL)
	default:
		// 429 and the like say nothing about the client's access.
		delete(c.m, key)
	}
	close(e.ready)
	c.mu.Unlock()
	if e.err != nil {
		return -1, "failed", e.err
	}
	if e.status != http.StatusOK {
		return -1, "refused", e.answer(u)
	}
	if key.cred == ([32]byte{}) && digest != "" {
		return e.length, "public", nil
	}
	return e.length, "allowed", nil
}

func (e *authEntry) answer(u *url.URL) error {
	if e.status == http.StatusOK {
		return nil
	}
	return &peer.OriginError{URL: u.Scheme + "://" + u.Host + u.EscapedPath(), StatusCode: e.status, Header: e.header}
}

// pruneLocked drops expired answers once there are many.
func (c *authChecker) pruneLocked(now time.Time) {
	if len(c.m) < maxAuthEntries/2 && len(c.public) < maxAuthEntries/2 {
		return
	}
	for k, e := range c.m {
		select {
		case <-e.ready:
			if !now.Before(e.until) {
				delete(c.m, k)
			}
		default:
		}
	}
	for k, until := range c.public {
		if !now.Before(until) {
			delete(c.public, k)
		}
	}
	if len(c.m) >= maxAuthEntries {
		// Someone is cycling credentials: forget finished answers rather
		// than grow; they are asked again.
		for k, e := range c.m {
			select {
			case <-e.ready:
				delete(c.m, k)
			default:
			}
		}
	}
}

// ask puts the question to the origin: 200 means the client may read it.
func (c *authChecker) ask(ctx context.Context, u *url.URL, in http.Header, registry bool) (int, http.Header, int64, error) {
	method := http.MethodHead
	if !registry {
		method = http.MethodGet
	}
	req, err := http.NewRequestWithContext(ctx, method, u.String(), nil)
	if err != nil {
		return 0, nil, -1, fmt.Errorf("check access to %s: %w", u.Host, err)
	}
	for _, k := range []string{"Authorization", "Cookie"} {
		for _, v := range in.Values(k) {
			req.Header.Add(k, v)
		}
	}
	if !registry {
		req.Header.Set("Range", "bytes=0-0")
	}
	resp, err := c.client.Do(req)
	if err != nil {
		return 0, nil, -1, fmt.Errorf("check access to %s: %w", u.Host, err)
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 4096))
	resp.Body.Close()
	length := int64(-1)
	switch {
	case resp.StatusCode == http.StatusOK && registry:
		length = resp.ContentLength
	case resp.StatusCode == http.StatusOK:
		// The range was ignored; the answer is still yes.
	case resp.StatusCode == http.StatusPartialContent:
		cr := resp.Header.Get("Content-Range")
		if i := strings.LastIndexByte(cr, '/'); i >= 0 {
			if n, err := strconv.ParseInt(cr[i+1:], 10, 64); err == nil {
				length = n
			}
		}
		return http.StatusOK, nil, length, nil
	case resp.StatusCode == http.StatusRequestedRangeNotSatisfiable && !registry:
		// An empty object: readable.
		return http.StatusOK, nil, 0, nil
	case resp.StatusCode >= 500 || (resp.StatusCode >= 300 && resp.StatusCode < 400):
		return 0, nil, -1, fmt.Errorf("check access to %s: the origin answered %s", u.Host, resp.Status)
	}
	return resp.StatusCode, resp.Header, length, nil
}
