package peer

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"

	"github.com/starling-dev/starling/api/schedulerpb"
	"github.com/starling-dev/starling/pkg/cluster"
	"github.com/starling-dev/starling/pkg/serve"
	"github.com/starling-dev/starling/pkg/storage"
)

// piecePath is where the upload server serves piece N of a task.
const piecePath = "/pieces/"

// uploader serves stored pieces to other peers, within a bound on
// concurrent uploads (a full peer answers 503 at once, so the downloader
// asks the next parent) and on bandwidth.
type uploader struct {
	p       *Peer
	l       net.Listener
	srv     *http.Server
	slots   chan struct{}
	active  atomic.Int64
	limit   *rate.Limiter // nil: unlimited
	corrupt bool
}

func newUploader(p *Peer, l net.Listener) *uploader {
	u := &uploader{p: p, l: l, slots: make(chan struct{}, p.o.UploadConcurrency),
		corrupt: os.Getenv("STARLING_TEST_CORRUPT_UPLOADS") == "1"}
	if p.o.UploadRate > 0 {
		u.limit = rate.NewLimiter(rate.Limit(p.o.UploadRate), int(min(p.o.UploadRate, 1<<20)))
	}
	if u.corrupt {
		p.log.Warn("STARLING_TEST_CORRUPT_UPLOADS is set: this peer serves corrupted pieces (test hook)")
	}
	mux := http.NewServeMux()
	mux.HandleFunc(piecePath, u.servePiece)
	mux.HandleFunc(rangePath, u.serveRange)
	u.srv = serve.HTTPServer(mux)
	// Failed TLS handshakes (strangers without a cluster certificate) are
	// one line each: debug, so that knocking cannot flood the log.
	u.srv.ErrorLog = slog.NewLogLogger(p.log.Handler(), slog.LevelDebug)
	return u
}

func (u *uploader) serve() {
	if err := u.srv.Serve(u.l); err != nil && !errors.Is(err, http.ErrServerClosed) {
		u.p.log.Error("upload server", "addr", u.l.Addr(), "err", err)
	}
}

func (u *uploader) close() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_ = u.srv.Shutdown(ctx)
}

func (u *uploader) load() int { return int(u.active.Load()) }

// servePiece answers GET /pieces/<task>/<n> with the piece and its digest.
func (u *uploader) servePiece(w http.ResponseWriter, r *http.Request) {
	rest := strings.TrimPrefix(r.URL.Path, piecePath)
	i := strings.LastIndexByte(rest, '/')
	if i < 0 {
		http.Error(w, "want /pieces/<task>/<n>", http.StatusBadRequest)
		return
	}
	id, err := url.PathUnescape(rest[:i])
	n, err2 := strconv.Atoi(rest[i+1:])
	if err != nil || err2 != nil || n < 0 {
		http.Error(w, "want /pieces/<task>/<n>", http.StatusBadRequest)
		return
	}
	st, done, ok := u.open(w, id)
	if !ok {
		return
	}
	defer done()
	f, l, sum, ok, err := st.OpenPiece(n)
	if err != nil {
		u.p.log.Error("read piece for upload", "task", id, "piece", n, "err", err)
		http.Error(w, "read piece", http.StatusInternalServerError)
		return
	}
	if !ok {
		http.Error(w, "piece not held", http.StatusNotFound)
		return
	}
	defer f.Close()
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Length", strconv.FormatInt(l, 10))
	w.Header().Set("X-Piece-Digest", sum)
	u.send(w, r, io.LimitReader(f, l))
}

// serveRange answers GET /ranges/<task> with one byte range ("Range:
// bytes=a-b") the peer holds, in whole pieces or verified ranges.
func (u *uploader) serveRange(w http.ResponseWriter, r *http.Request) {
	id, err := url.PathUnescape(strings.TrimPrefix(r.URL.Path, rangePath))
	if err != nil || id == "" || strings.Contains(id, "/") {
		http.Error(w, "want /ranges/<task>", http.StatusBadRequest)
		return
	}
	off, n, ok := parseByteRange(r.Header.Get("Range"))
	if !ok {
		http.Error(w, "want one Range: bytes=a-b", http.StatusBadRequest)
		return
	}
	st, done, ok := u.open(w, id)
	if !ok {
		return
	}
	defer done()
	if off+n > st.Length() {
		http.Error(w, "range past the end", http.StatusRequestedRangeNotSatisfiable)
		return
	}
	if !st.Covered(off, n) {
		if fl := u.p.flights.await(r.Context(), id, off, off+n); fl != nil {
			u.streamFlight(w, r, st, fl, off, n)
			return
		}
		http.Error(w, "range not held", http.StatusNotFound)
		return
	}
	f, err := st.OpenAt(off)
	if err != nil {
		u.p.log.Error("read range for upload", "task", id, "range", fmt.Sprintf("%d+%d", off, n), "err", err)
		http.Error(w, "read range", http.StatusInternalServerError)
		return
	}
	defer f.Close()
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Length", strconv.FormatInt(n, 10))
	w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", off, off+n-1, st.Length()))
	w.WriteHeader(http.StatusPartialContent)
	u.send(w, r, io.LimitReader(f, n))
}

// streamFlight answers a range this peer is fetching from the origin now,
// each part as soon as it is written. The bytes are not verified yet: the
// receiver verifies them against its layer's TOC before anyone reads them,
// as it does every range. A fetch that fails or stalls cuts the answer
// short, and the receiver reads the rest from the registry.
func (u *uploader) streamFlight(w http.ResponseWriter, r *http.Request, st *storage.Task, fl *flight, off, n int64) {
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Length", strconv.FormatInt(n, 10))
	w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", off, off+n-1, st.Length()))
	w.WriteHeader(http.StatusPartialContent)
	flusher, _ := w.(http.Flusher)
	buf := make([]byte, 64<<10)
	cur, end := off, off+n
	corrupted := false
	for cur < end {
		pos, ok := fl.wait(r.Context(), cur)
		if pos <= cur && !ok {
			return
		}
		for stop := min(pos, end); cur < stop; {
			k := min(int64(len(buf)), stop-cur)
			if _, err := st.ReadAt(buf[:k], cur); err != nil {
				return
			}
			if u.corrupt && !corrupted {
				buf[k/2] ^= 0xff
				corrupted = true
			}
			if u.limit != nil {
				if err := u.limit.WaitN(r.Context(), int(k)); err != nil {
					return
				}
			}
			if _, err := w.Write(buf[:k]); err != nil {
				return
			}
			u.p.m.uploadBytes.Add(float64(k))
			cur += k
		}
		if flusher != nil {
			flusher.Flush()
		}
	}
}

// open takes an upload slot and the stored task id, protected from GC
// until done; it answers the request itself when it cannot.
func (u *uploader) open(w http.ResponseWriter, id string) (st *storage.Task, done func(), ok bool) {
	release, ok := u.slot(w)
	if !ok {
		return nil, nil, false
	}
	st, ok = u.p.store.Lookup(id)
	if !ok {
		release()
		http.Error(w, "no such task", http.StatusNotFound)
		return nil, nil, false
	}
	st.Acquire()
	return st, func() { st.Release(); release() }, true
}

// parseByteRange reads a single "bytes=a-b" range.
func parseByteRange(h string) (off, n int64, ok bool) {
	spec, found := strings.CutPrefix(h, "bytes=")
	if !found {
		return 0, 0, false
	}
	a, b, found := strings.Cut(spec, "-")
	if !found {
		return 0, 0, false
	}
	first, err1 := strconv.ParseInt(a, 10, 64)
	last, err2 := strconv.ParseInt(b, 10, 64)
	if err1 != nil || err2 != nil || first < 0 || last < first {
		return 0, 0, false
	}
	return first, last - first + 1, true
}

// slot takes an upload slot, or answers 503 at once when all are taken
// (the downloader then asks the next parent).
func (u *uploader) slot(w http.ResponseWriter) (release func(), ok bool) {
	select {
	case u.slots <- struct{}{}:
	default:
		http.Error(w, "upload slots full", http.StatusServiceUnavailable)
		return nil, false
	}
	u.active.Add(1)
	u.p.m.uploads.Inc()
	return func() {
		<-u.slots
		u.active.Add(-1)
		u.p.m.uploads.Dec()
	}, true
}

// send writes an upload's body within the bandwidth limit.
func (u *uploader) send(w http.ResponseWriter, r *http.Request, src io.Reader) {
	if u.corrupt {
		data, err := io.ReadAll(src)
		if err != nil || len(data) == 0 {
			return
		}
		data[len(data)/2] ^= 0xff
		src = bytes.NewReader(data)
	}
	if u.limit == nil && !u.corrupt {
		// The common case goes out with sendfile: no copy through user space.
		k, _ := io.Copy(w, src)
		u.p.m.uploadBytes.Add(float64(k))
		return
	}
	buf := make([]byte, 64<<10)
	for {
		k, err := src.Read(buf)
		if k > 0 {
			if u.limit != nil {
				if err := u.limit.WaitN(r.Context(), k); err != nil {
					return
				}
			}
			if _, err := w.Write(buf[:k]); err != nil {
				return
			}
			u.p.m.uploadBytes.Add(float64(k))
		}
		if err != nil {
			return
		}
	}
}

// errBusy is a parent's answer when all its upload slots are taken.
var errBusy = errors.New("parent busy")

// newParentClients makes the clients that fetch pieces (parentClient) and
// ranges (rangeClient) from other peers, over TLS with cfg when it is set.
// They never go through an HTTP proxy from the environment: peers talk
// directly. They are the peer's own, not globals, because each peer of a
// process (tests, starling get) has its own identity. A parent answers
// ranges from its disk: its headers come at once or it is not worth
// waiting for (the origin is), while the body may take as long as the
// reader's context allows.
func newParentClients(cfg *tls.Config) (parent, ranges *http.Client) {
	mk := func(dialTimeout, headerTimeout time.Duration) *http.Client {
		d := &net.Dialer{Timeout: dialTimeout, KeepAlive: 30 * time.Second}
		t := &http.Transport{
			Proxy:                 nil,
			DialContext:           d.DialContext,
			ResponseHeaderTimeout: headerTimeout,
			MaxIdleConnsPerHost:   16,
			IdleConnTimeout:       90 * time.Second,
		}
		if cfg != nil {
			t.DialTLSContext = cluster.DialTLS(cfg, d)
			t.TLSHandshakeTimeout = dialTimeout
		}
		return &http.Client{Transport: t}
	}
	return mk(3*time.Second, 0), mk(time.Second, time.Second)
}

// parentURL is the address of path on a parent's upload server.
func (p *Peer) parentURL(par *schedulerpb.PeerInfo, path string) string {
	scheme := "http"
	if p.o.ClientTLS != nil {
		scheme = "https"
	}
	return scheme + "://" + net.JoinHostPort(par.GetIp(), strconv.Itoa(int(par.GetUploadPort()))) + path
}

// fetchPiece downloads piece n of a task from a parent. The caller checks it.
func (p *Peer) fetchPiece(ctx context.Context, par *schedulerpb.PeerInfo, taskID string, n int, want int64) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, p.o.PieceTimeout)
	defer cancel()
	u := p.parentURL(par, fmt.Sprintf("%s%s/%d", piecePath, url.PathEscape(taskID), n))
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, err
	}
	resp, err := p.parentClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusServiceUnavailable {
		return nil, errBusy
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("%s: %s", u, resp.Status)
	}
	data := make([]byte, want)
	if _, err := io.ReadFull(resp.Body, data); err != nil {
		return nil, fmt.Errorf("%s: %w", u, err)
	}
	return data, nil
}
