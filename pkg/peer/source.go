package peer

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
)

type httpSource struct {
	client *http.Client
	url    string
	auth   func(ctx context.Context, url string) (string, error)

	mu     sync.Mutex
	header http.Header
}

// SourceOption changes an HTTPSource.
type SourceOption func(*httpSource)

// WithAuthorizer makes an HTTPSource answer an origin's 401 with the
// Authorization header auth gives (Options.Authorizer: the node's own
// credentials) and try once more; later requests keep sending it. nil
// does nothing.
func WithAuthorizer(auth func(ctx context.Context, url string) (string, error)) SourceOption {
	return func(s *httpSource) { s.auth = auth }
}

// setHeader replaces the headers sent to the origin: a client that comes
// back with a fresh token (the first one expired mid-download) must not
// keep getting 401 for the old one.
func (s *httpSource) setHeader(h http.Header) {
	s.mu.Lock()
	s.header = h
	s.mu.Unlock()
}

// HTTPSource fetches a URL with ranged GETs, sending header with every
// request (the client's Authorization included).
func HTTPSource(client *http.Client, url string, header http.Header, opts ...SourceOption) Source {
	if client == nil {
		client = http.DefaultClient
	}
	s := &httpSource{client: client, url: url, header: header}
	for _, o := range opts {
		o(s)
	}
	return s
}

// do sends one request; a 401 is answered once with the node's own
// credentials when there is an authorizer and it gives a header other
// than the one refused.
func (s *httpSource) do(ctx context.Context, method, rng string) (*http.Response, error) {
	req, err := s.request(ctx, method)
	if err != nil {
		return nil, err
	}
	if rng != "" {
		req.Header.Set("Range", rng)
	}
	resp, err := s.client.Do(req)
	if err != nil || resp.StatusCode != http.StatusUnauthorized || s.auth == nil {
		return resp, err
	}
	h, aerr := s.auth(ctx, s.url)
	if aerr != nil || h == "" || h == req.Header.Get("Authorization") {
		// The origin's 401 stands: the node has nothing better.
		return resp, nil
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 4096))
	resp.Body.Close()
	s.mu.Lock()
	hdr := s.header.Clone()
	if hdr == nil {
		hdr = http.Header{}
	}
	hdr.Set("Authorization", h)
	s.header = hdr
	s.mu.Unlock()
	if req, err = s.request(ctx, method); err != nil {
		return nil, err
	}
	if rng != "" {
		req.Header.Set("Range", rng)
	}
	return s.client.Do(req)
}

func (s *httpSource) request(ctx context.Context, method string) (*http.Request, error) {
	req, err := http.NewRequestWithContext(ctx, method, s.url, nil)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for k, vs := range s.header {
		for _, v := range vs {
			req.Header.Add(k, v)
		}
	}
	return req, nil
}

func (s *httpSource) Size(ctx context.Context) (int64, error) {
	resp, err := s.do(ctx, http.MethodHead, "")
	if err != nil {
		return 0, fmt.Errorf("size of %s: %w", s.url, err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return 0, &OriginError{URL: s.url, StatusCode: resp.StatusCode, Header: resp.Header}
	}
	if resp.ContentLength >= 0 {
		return resp.ContentLength, nil
	}
	// Some servers do not say the length on HEAD; a one-byte range does.
	resp, err = s.do(ctx, http.MethodGet, "bytes=0-0")
	if err != nil {
		return 0, fmt.Errorf("size of %s: %w", s.url, err)
	}
	resp.Body.Close()
	if resp.StatusCode == http.StatusPartialContent {
		cr := resp.Header.Get("Content-Range")
		if i := strings.LastIndexByte(cr, '/'); i >= 0 {
			if n, err := strconv.ParseInt(cr[i+1:], 10, 64); err == nil {
				return n, nil
			}
		}
	}
	return 0, fmt.Errorf("size of %s: the server does not say it", s.url)
}

func (s *httpSource) Fetch(ctx context.Context, off, length int64) (io.ReadCloser, error) {
	resp, err := s.do(ctx, http.MethodGet, fmt.Sprintf("bytes=%d-%d", off, off+length-1))
	if err != nil {
		return nil, fmt.Errorf("fetch %d bytes at %d of %s: %w", length, off, s.url, err)
	}
	switch resp.StatusCode {
	case http.StatusPartialContent:
		return resp.Body, nil
	case http.StatusOK:
		// The server ignored the range: skip to it.
		if _, err := io.CopyN(io.Discard, resp.Body, off); err != nil {
			resp.Body.Close()
			return nil, fmt.Errorf("fetch %d bytes at %d of %s: %w", length, off, s.url, err)
		}
		return struct {
			io.Reader
			io.Closer
		}{io.LimitReader(resp.Body, length), resp.Body}, nil
	default:
		resp.Body.Close()
		return nil, &OriginError{URL: s.url, StatusCode: resp.StatusCode, Header: resp.Header}
	}
}

// workHeaders are the only request headers that go to the scheduler with a
// task (and so to whichever seed takes it): none of them names or proves
// who asks.
var workHeaders = []string{"Accept"}

// WorkHeader is what of h may travel with a task to the scheduler and the
// seeds: Accept, nothing that carries a credential.
func WorkHeader(h http.Header) http.Header {
	out := http.Header{}
	for _, k := range workHeaders {
		if vs := h.Values(k); len(vs) > 0 {
			out[k] = append([]string(nil), vs...)
		}
	}
	return out
}

// WorkURL is rawURL without user information, which is a credential.
// A URL that does not parse goes as it is: the seed's fetch fails on it.
func WorkURL(rawURL string) string {
	u, err := url.Parse(rawURL)
	if err != nil || u.User == nil {
		return rawURL
	}
	u.User = nil
	return u.String()
}
