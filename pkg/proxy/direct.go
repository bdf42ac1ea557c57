package proxy

import (
	"context"
	"errors"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"sync"
	"time"

	"github.com/starling-dev/starling/pkg/allow"
)

type upstreamKey struct{}

// newDirect is the reverse proxy of everything that does not go through
// P2P. It streams both ways and buffers no body, so pushes of large layers
// and long manifest lists pass as they come.
func (x *Proxy) newDirect() *httputil.ReverseProxy {
	return &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			u := pr.In.Context().Value(upstreamKey{}).(*url.URL)
			out := *u
			pr.Out.URL = &out
			// The Host header names the upstream, not this proxy.
			pr.Out.Host = ""
			for _, h := range []string{HeaderRegistry, HeaderTag, HeaderFilter, HeaderUseP2P} {
				pr.Out.Header.Del(h)
			}
			// Authorization stays: the client's token is for the upstream.
		},
		Transport: x.o.Transport,
		ModifyResponse: func(resp *http.Response) error {
			resp.Body = &countingBody{ReadCloser: resp.Body, add: x.m.bytes.WithLabelValues("direct").Add}
			if resp.StatusCode >= 400 {
				x.logFailure(resp.Request, "direct", resp.StatusCode, resp.Request.URL, nil)
			}
			return nil
		},
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			u := r.Context().Value(upstreamKey{}).(*url.URL)
			if r.Context().Err() != nil {
				// The client went away; there is nobody to answer.
				x.log.Debug("proxy request canceled", "method", r.Method, "url", u.String(), "err", err)
				return
			}
			var refused *allow.RefusedError
			if errors.As(err, &refused) {
				x.refuse(w, r, refused)
				return
			}
			x.logFailure(r, "direct", http.StatusBadGateway, u, err)
			http.Error(w, "upstream "+u.Host+": "+oneLine(err), http.StatusBadGateway)
		},
		ErrorLog: log.New(io.Discard, "", 0),
	}
}

func (x *Proxy) serveDirect(w http.ResponseWriter, r *http.Request, u *url.URL) {
	x.direct.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), upstreamKey{}, u)))
}

// tunnel answers CONNECT with a plain TCP tunnel, so that a client using
// this as its HTTPS proxy still reaches TLS hosts (without P2P: the bytes
// are encrypted end to end).
func (x *Proxy) tunnel(w http.ResponseWriter, r *http.Request) {
	x.m.requests.WithLabelValues("direct").Inc()
	u := &url.URL{Scheme: "tcp", Host: r.Host}
	if _, _, err := net.SplitHostPort(r.Host); err != nil {
		x.logFailure(r, "direct", http.StatusBadRequest, u, err)
		http.Error(w, "CONNECT needs HOST:PORT", http.StatusBadRequest)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 30*time.Second)
	up, err := x.allow.DialContext(ctx, "tcp", r.Host)
	cancel()
	var refused *allow.RefusedError
	if errors.As(err, &refused) {
		x.refuse(w, r, err)
		return
	}
	if err != nil {
		x.logFailure(r, "direct", http.StatusBadGateway, u, err)
		http.Error(w, "connect "+r.Host+": "+oneLine(err), http.StatusBadGateway)
		return
	}
	conn, buf, err := http.NewResponseController(w).Hijack()
	if err != nil {
		up.Close()
		x.logFailure(r, "direct", http.StatusInternalServerError, u, err)
		http.Error(w, "CONNECT: "+oneLine(err), http.StatusInternalServerError)
		return
	}
	if _, err := conn.Write([]byte("HTTP/1.1 200 Connection established\r\n\r\n")); err != nil {
		up.Close()
		conn.Close()
		return
	}
	var in io.Reader = conn
	if n := buf.Reader.Buffered(); n > 0 {
		in = io.MultiReader(io.LimitReader(buf.Reader, int64(n)), conn)
	}
	x.pipe(up, struct {
		io.Reader
		io.Writer
	}{in, conn}, func() { up.Close(); conn.Close() })
}

// pipe copies both ways until either side ends, then closes both; what
// the upstream sends counts as response bytes.
func (x *Proxy) pipe(up net.Conn, client io.ReadWriter, closeAll func()) {
	count := x.m.bytes.WithLabelValues("direct")
	var once sync.Once
	done := make(chan struct{}, 2)
	go func() {
		_, _ = io.Copy(up, client)
		once.Do(closeAll)
		done <- struct{}{}
	}()
	n, _ := io.Copy(client, up)
	count.Add(float64(n))
	once.Do(closeAll)
	<-done
}

type countingBody struct {
	io.ReadCloser
	add func(float64)
}

func (b *countingBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if n > 0 {
		b.add(float64(n))
	}
	return n, err
}
