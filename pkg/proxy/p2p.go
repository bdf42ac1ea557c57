package proxy

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"mime/multipart"
	"net/http"
	"net/textproto"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/starling-dev/starling/pkg/allow"
	"github.com/starling-dev/starling/pkg/peer"
	"github.com/starling-dev/starling/pkg/taskid"
)

// serveP2P answers a GET from the peer: the task's pieces come from other
// peers or the origin, as the scheduler says, and are streamed in order as
// they arrive.
func (x *Proxy) serveP2P(w http.ResponseWriter, r *http.Request, u *url.URL) {
	ctx := r.Context()
	filters := x.filters
	tag := r.Header.Get(HeaderTag)
	if f := r.Header.Get(HeaderFilter); f != "" {
		extra := strings.Split(f, "&")
		filters = append(slices.Clone(filters), extra...)
		// A client's own filters are its claim that those parameters do
		// not change the bytes; they name a task only for clients that
		// make the same claim. Otherwise anyone could fill the task of
		// a plain URL with what the URL plus a filtered parameter
		// returns.
		slices.Sort(extra)
		tag += "\x00filters=" + strings.Join(slices.Compact(extra), "&")
	}
	// A registry blob URL names its digest: the peer checks the whole blob
	// against it, and the blob through one registry is one task
	// (RegistryTaskID says why not one across registries).
	id, isBlob := RegistryTaskID(u)
	digest, _ := taskid.RegistryDigest(u)
	if !isBlob {
		var err error
		if id, err = taskid.ForURL(u.String(), tag, filters); err != nil {
			x.logFailure(r, "p2p", http.StatusBadRequest, u, err)
			http.Error(w, oneLine(err), http.StatusBadRequest)
			return
		}
	}
	// What the task holds was fetched with someone's credentials: the
	// origin says first whether this client may read it.
	length, result, err := x.auth.check(ctx, u, r.Header, digest)
	x.m.authz.WithLabelValues(result).Inc()
	if err != nil {
		x.fail(w, r, u, err)
		return
	}
	d, err := x.p.Open(ctx, peer.Request{TaskID: id, URL: u.String(), Header: originHeader(r.Header), Digest: digest, Length: max(length, 0)})
	if err != nil {
		x.fail(w, r, u, err)
		return
	}
	defer d.Close()

	size := d.Length()
	var ranges []byteRange // nil: the whole blob
	if rg := r.Header.Get("Range"); rg != "" && x.ifRange(r, digest) {
		rs, err := parseRanges(rg, size)
		switch {
		case errors.Is(err, errUnsatisfiable):
			w.Header().Set("Content-Range", fmt.Sprintf("bytes */%d", size))
			x.logFailure(r, "p2p", http.StatusRequestedRangeNotSatisfiable, u, fmt.Errorf("range %q of %d bytes", rg, size))
			w.WriteHeader(http.StatusRequestedRangeNotSatisfiable)
			return
		case err == nil:
			ranges = rs
			if x.o.Prefetch {
				d.Start()
			}
		}
		// Otherwise (another unit, a header we do not understand, or
		// ranges that add up to more than the blob) the answer is the
		// whole blob with 200, which RFC 9110 allows.
	}
	a := answer{x: x, w: w, r: r, u: u, d: d, id: id, digest: digest}
	switch len(ranges) {
	case 0:
		a.single(byteRange{0, size}, http.StatusOK)
	case 1:
		a.single(ranges[0], http.StatusPartialContent)
	default:
		a.multipart(ranges)
	}
}

// answer is one P2P response being written. Every byte of it comes from
// the task's reader, which hands out a piece only once it is verified, so
// a range answer carries the same guarantee as a whole one.
type answer struct {
	x      *Proxy
	w      http.ResponseWriter
	r      *http.Request
	u      *url.URL
	d      *peer.Download
	id     string
	digest string
}

// headers sets the headers every P2P answer carries.
func (a *answer) headers(contentType string, length int64) {
	h := a.w.Header()
	h.Set("Content-Type", contentType)
	h.Set("Accept-Ranges", "bytes")
	h.Set("Content-Length", strconv.FormatInt(length, 10))
	h.Set(HeaderTask, a.id)
	if a.digest != "" {
		h.Set("Docker-Content-Digest", a.digest)
		h.Set("Etag", `"`+a.digest+`"`)
	}
}

// first waits for the first bytes of rd before anything is answered, so
// that an origin's refusal (an expired token, a deleted blob) is still
// relayed with its own status; ok is false when it was.
func (a *answer) first(rd io.Reader, buf []byte) (chunk []byte, ok bool) {
	k, err := io.ReadAtLeast(rd, buf, 1)
	if err != nil {
		a.x.fail(a.w, a.r, a.u, err)
		return nil, false
	}
	return buf[:k], true
}

// body is the response body: writes are counted, and a failed write ends
// the response.
func (a *answer) body() io.Writer {
	return writerFunc(func(b []byte) (int, error) {
		n, err := a.w.Write(b)
		a.x.m.bytes.WithLabelValues("p2p").Add(float64(n))
		if err != nil {
			a.x.abort(a.r, a.u, fmt.Errorf("write to client: %w", err))
		}
		return n, nil
	})
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(b []byte) (int, error) { return f(b) }

// single answers with one range: the whole blob (200) or a part of it (206).
func (a *answer) single(br byteRange, status int) {
	ctx := a.r.Context()
	size := a.d.Length()
	rd := a.d.NewReader(ctx, br.off, br.n)
	defer rd.Close()
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	buf := *bp
	var chunk []byte
	if br.n > 0 {
		var ok bool
		if chunk, ok = a.first(rd, buf); !ok {
			return
		}
	}
	a.headers("application/octet-stream", br.n)
	if status == http.StatusPartialContent {
		a.w.Header().Set("Content-Range", contentRange(br, size))
	}
	a.w.WriteHeader(status)

	out := a.body()
	// A whole blob's last byte waits until the peer has checked the blob
	// against its digest: a client that does not check digests itself
	// then never gets a wrong blob whole, only a cut-off body.
	verify := a.digest != "" && status == http.StatusOK && br.n > 0
	for sent := int64(0); ; {
		if verify && sent+int64(len(chunk)) == br.n {
			out.Write(chunk[:len(chunk)-1])
			if err := a.d.Wait(ctx); err != nil {
				a.x.abort(a.r, a.u, err)
			}
			out.Write(chunk[len(chunk)-1:])
			return
		}
		out.Write(chunk)
		sent += int64(len(chunk))
		if sent >= br.n {
			return
		}
		k, err := rd.Read(buf)
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = fmt.Errorf("task %s ended after %d of %d bytes", a.id, br.off+sent, br.off+br.n)
			}
			a.x.abort(a.r, a.u, err)
		}
		chunk = buf[:k]
	}
}

// multipart answers with several ranges as one multipart/byteranges body
// (RFC 9110 14.6), in the order asked, as registries and Dragonfly do:
// stargz-snapshotter asks for the chunks a read needs in one request.
func (a *answer) multipart(ranges []byteRange) {
	ctx := a.r.Context()
	size := a.d.Length()
	// Every range's pieces are wanted at once, so they come in parallel.
	rds := make([]io.ReadCloser, len(ranges))
	for i, br := range ranges {
		rds[i] = a.d.NewReader(ctx, br.off, br.n)
	}
	defer func() {
		for _, rd := range rds {
			rd.Close()
		}
	}()
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	buf := *bp
	chunk, ok := a.first(rds[0], buf)
	if !ok {
		return
	}

	boundary := multipartBoundary()
	a.headers("multipart/byteranges; boundary="+boundary, multipartLength(boundary, ranges, size))
	a.w.WriteHeader(http.StatusPartialContent)

	mw := multipart.NewWriter(a.body())
	if err := mw.SetBoundary(boundary); err != nil {
		a.x.abort(a.r, a.u, err)
	}
	for i, br := range ranges {
		pw, err := mw.CreatePart(partHeader(br, size))
		if err != nil {
			a.x.abort(a.r, a.u, err)
		}
		sent := int64(0)
		if i == 0 {
			pw.Write(chunk)
			sent = int64(len(chunk))
		}
		for sent < br.n {
			k, err := rds[i].Read(buf[:min(int64(len(buf)), br.n-sent)])
			if err != nil {
				if errors.Is(err, io.EOF) {
					err = fmt.Errorf("task %s ended at %d, in range %d-%d", a.id, br.off+sent, br.off, br.off+br.n-1)
				}
				a.x.abort(a.r, a.u, err)
			}
			pw.Write(buf[:k])
			sent += int64(k)
		}
	}
	if err := mw.Close(); err != nil {
		a.x.abort(a.r, a.u, err)
	}
}

func contentRange(br byteRange, size int64) string {
	return fmt.Sprintf("bytes %d-%d/%d", br.off, br.off+br.n-1, size)
}

func partHeader(br byteRange, size int64) textproto.MIMEHeader {
	return textproto.MIMEHeader{
		"Content-Type":  {"application/octet-stream"},
		"Content-Range": {contentRange(br, size)},
	}
}

// multipartLength is the exact length of the multipart body, so that the
// answer has a Content-Length and a cut-off body is seen as one.
func multipartLength(boundary string, ranges []byteRange, size int64) int64 {
	var c countWriter
	mw := multipart.NewWriter(&c)
	_ = mw.SetBoundary(boundary)
	for _, br := range ranges {
		_, _ = mw.CreatePart(partHeader(br, size))
		c += countWriter(br.n)
	}
	_ = mw.Close()
	return int64(c)
}

type countWriter int64

func (c *countWriter) Write(b []byte) (int, error) {
	*c += countWriter(len(b))
	return len(b), nil
}

// multipartBoundary is a random boundary: the parts are blob bytes, which
// may hold any fixed string.
func multipartBoundary() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
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
	var refused *allow.RefusedError
	if errors.As(err, &refused) {
		x.refuse(w, r, refused)
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
