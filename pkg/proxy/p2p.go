package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/starling-dev/starling/pkg/peer"
	"github.com/starling-dev/starling/pkg/taskid"
)

// serveP2P answers a GET from the peer: the task's pieces come from other
// peers or the origin, as the scheduler says, and are streamed in order as
// they arrive.
func (x *Proxy) serveP2P(w http.ResponseWriter, r *http.Request, u *url.URL) {
	ctx := r.Context()
	filters := x.filters
	if f := r.Header.Get(HeaderFilter); f != "" {
		filters = append(slices.Clone(filters), strings.Split(f, "&")...)
	}
	id, err := taskid.ForURL(u.String(), r.Header.Get(HeaderTag), filters)
	if err != nil {
		x.logFailure(r, "p2p", http.StatusBadRequest, u, err)
		http.Error(w, oneLine(err), http.StatusBadRequest)
		return
	}
	// A registry blob URL names its digest: the peer checks the whole blob
	// against it, and the same blob through any registry is one task.
	digest, _ := taskid.RegistryDigest(u)
	d, err := x.p.Open(ctx, peer.Request{TaskID: id, URL: u.String(), Header: originHeader(r.Header), Digest: digest})
	if err != nil {
		x.fail(w, r, u, err)
		return
	}
	defer d.Close()

	size := d.Length()
	off, length, status := int64(0), size, http.StatusOK
	var contentRange string
	if rg := r.Header.Get("Range"); rg != "" && x.ifRange(r, digest) {
		start, n, err := parseRange(rg, size)
		switch {
		case errors.Is(err, errUnsatisfiable):
			w.Header().Set("Content-Range", fmt.Sprintf("bytes */%d", size))
			x.logFailure(r, "p2p", http.StatusRequestedRangeNotSatisfiable, u, fmt.Errorf("range %q of %d bytes", rg, size))
			w.WriteHeader(http.StatusRequestedRangeNotSatisfiable)
			return
		case err == nil:
			off, length, status = start, n, http.StatusPartialContent
			contentRange = fmt.Sprintf("bytes %d-%d/%d", off, off+length-1, size)
			if x.o.Prefetch {
				d.Start()
			}
		}
		// Otherwise (several ranges, or a header we do not understand) the
		// answer is the whole blob with 200, which RFC 9110 allows: the
		// registry clients we serve ask for one range at a time, and a
		// multipart/byteranges body would be code that nobody uses.
	}

	rd := d.NewReader(ctx, off, length)
	defer rd.Close()
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	buf := *bp
	var chunk []byte
	if length > 0 {
		// Wait for the first bytes before answering, so that an origin's
		// refusal (an expired token, a deleted blob) is still relayed with
		// its own status.
		k, err := io.ReadAtLeast(rd, buf, 1)
		if err != nil {
			x.fail(w, r, u, err)
			return
		}
		chunk = buf[:k]
	}

	h := w.Header()
	h.Set("Content-Type", "application/octet-stream")
	h.Set("Accept-Ranges", "bytes")
	h.Set("Content-Length", strconv.FormatInt(length, 10))
	h.Set(HeaderTask, id)
	if digest != "" {
		h.Set("Docker-Content-Digest", digest)
		h.Set("Etag", `"`+digest+`"`)
	}
	if contentRange != "" {
		h.Set("Content-Range", contentRange)
	}
	w.WriteHeader(status)

	counter := x.m.bytes.WithLabelValues("p2p")
	write := func(b []byte) {
		if len(b) == 0 {
			return
		}
		n, err := w.Write(b)
		counter.Add(float64(n))
		if err != nil {
			x.abort(r, u, fmt.Errorf("write to client: %w", err))
		}
	}
	// A whole blob's last byte waits until the peer has checked the blob
	// against its digest: a client that does not check digests itself
	// then never gets a wrong blob whole, only a cut-off body.
	verify := digest != "" && status == http.StatusOK && length > 0
	for sent := int64(0); ; {
		if verify && sent+int64(len(chunk)) == length {
			write(chunk[:len(chunk)-1])
			if err := d.Wait(ctx); err != nil {
				x.abort(r, u, err)
			}
			write(chunk[len(chunk)-1:])
			return
		}
		write(chunk)
		sent += int64(len(chunk))
		if sent >= length {
			return
		}
		k, err := rd.Read(buf)
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = fmt.Errorf("task %s ended after %d of %d bytes", id, sent, length)
			}
			x.abort(r, u, err)
		}
		chunk = buf[:k]
	}
}

// bufPool holds copy buffers: a lazy pull through the mirror is many small
// range requests at once.
var bufPool = sync.Pool{New: func() any { b := make([]byte, 256<<10); return &b }}

// abort ends a response whose headers are out: the client sees a cut-off
// body (Content-Length was set), never a short one taken for whole.
func (x *Proxy) abort(r *http.Request, u *url.URL, err error) {
	if r.Context().Err() != nil {
		x.log.Debug("proxy request canceled", "method", r.Method, "url", u.String(), "err", err)
	} else {
		x.logFailure(r, "p2p", 0, u, fmt.Errorf("response cut off: %w", err))
	}
	panic(http.ErrAbortHandler)
}

// fail answers a P2P request that could not start. An origin's refusal is
// relayed with its status and headers: containerd, given a 401 and its
// WWW-Authenticate, fetches a token and tries again.
func (x *Proxy) fail(w http.ResponseWriter, r *http.Request, u *url.URL, err error) {
	if errors.Is(err, context.Canceled) && r.Context().Err() != nil {
		x.log.Debug("proxy request canceled", "method", r.Method, "url", u.String(), "err", err)
		return
	}
	var oe *peer.OriginError
	if !errors.As(err, &oe) {
		x.logFailure(r, "p2p", http.StatusBadGateway, u, err)
		http.Error(w, "starling: "+oneLine(err), http.StatusBadGateway)
		return
	}
	x.logFailure(r, "p2p", oe.StatusCode, u, err)
	h := w.Header()
	for k, vs := range oe.Header {
		h[k] = slices.Clone(vs)
	}
	removeHopHeaders(h)
	// The origin's body is not relayed (the peer did not keep it), so
	// nothing that describes it either.
	for _, k := range []string{"Content-Length", "Content-Type", "Content-Encoding", "Content-Range", "Etag", "Last-Modified"} {
		h.Del(k)
	}
	if strings.Contains(u.Path, "/v2/") {
		// A registry client reads the errors of the distribution spec.
		h.Set("Content-Type", "application/json")
		w.WriteHeader(oe.StatusCode)
		fmt.Fprintf(w, `{"errors":[{"code":%q,"message":%q}]}`+"\n", registryCode(oe.StatusCode, u), http.StatusText(oe.StatusCode))
		return
	}
	h.Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(oe.StatusCode)
	fmt.Fprintln(w, oneLine(err))
}

// registryCode is the distribution spec's error code of an origin status.
func registryCode(status int, u *url.URL) string {
	switch status {
	case http.StatusUnauthorized:
		return "UNAUTHORIZED"
	case http.StatusForbidden:
		return "DENIED"
	case http.StatusNotFound:
		if _, ok := taskid.RegistryDigest(u); ok {
			return "BLOB_UNKNOWN"
		}
		return "NAME_UNKNOWN"
	case http.StatusTooManyRequests:
		return "TOOMANYREQUESTS"
	}
	return "UNKNOWN"
}

// ifRange reports whether a Range header applies: without If-Range it
// does; with one, only when it names the blob's ETag (its digest).
func (x *Proxy) ifRange(r *http.Request, digest string) bool {
	ir := r.Header.Get("If-Range")
	return ir == "" || (digest != "" && strings.Trim(strings.TrimPrefix(ir, "W/"), `"`) == digest)
}

// originHeader is what the peer sends to the origin: the client's headers,
// its Authorization included, less those about this hop or this one
// response (the peer asks for its own ranges).
func originHeader(in http.Header) http.Header {
	h := in.Clone()
	removeHopHeaders(h)
	for _, k := range []string{
		"Range", "If-Range", "If-Match", "If-None-Match", "If-Modified-Since", "If-Unmodified-Since",
		// Pieces are hashed as the origin sends them: never a compressed
		// encoding of the blob.
		"Accept-Encoding",
		"Content-Length", "Expect",
		HeaderRegistry, HeaderTag, HeaderFilter, HeaderUseP2P,
	} {
		h.Del(k)
	}
	return h
}

func oneLine(err error) string {
	return strings.ReplaceAll(err.Error(), "\n", " ")
}
