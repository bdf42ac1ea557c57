package peer

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
)

type httpSource struct {
	client *http.Client
	url    string

	mu     sync.Mutex
	header http.Header
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
func HTTPSource(client *http.Client, url string, header http.Header) Source {
	if client == nil {
		client = http.DefaultClient
	}
	return &httpSource{client: client, url: url, header: header}
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
	req, err := s.request(ctx, http.MethodHead)
	if err != nil {
		return 0, err
	}
	resp, err := s.client.Do(req)
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
	req, err = s.request(ctx, http.MethodGet)
	if err != nil {
		return 0, err
	}
	req.Header.Set("Range", "bytes=0-0")
	resp, err = s.client.Do(req)
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
	req, err := s.request(ctx, http.MethodGet)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Range", fmt.Sprintf("bytes=%d-%d", off, off+length-1))
	resp, err := s.client.Do(req)
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
