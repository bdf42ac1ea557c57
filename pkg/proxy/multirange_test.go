package proxy

import (
	"bytes"
	"fmt"
	"io"
	"mime"
	"mime/multipart"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// part is one part of a multipart/byteranges answer.
type part struct {
	off, end, size int64
	data           []byte
}

// contentRangeRE is how stargz-snapshotter's fs/remote reads a part's
// Content-Range.
var contentRangeRE = regexp.MustCompile(`bytes ([0-9]+)-([0-9]+)/([0-9]+|\*)`)

// readParts reads a multipart/byteranges answer the way stargz-snapshotter's
// fs/remote does: the boundary from Content-Type, then each part's
// Content-Range.
func readParts(t *testing.T, resp *http.Response) []part {
	t.Helper()
	mt, params, err := mime.ParseMediaType(resp.Header.Get("Content-Type"))
	if err != nil || mt != "multipart/byteranges" || params["boundary"] == "" {
		t.Fatalf("Content-Type %q: %v", resp.Header.Get("Content-Type"), err)
	}
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("read body: %v", err)
	}
	if cl := resp.Header.Get("Content-Length"); cl != strconv.Itoa(len(raw)) {
		t.Errorf("Content-Length %s, body %d bytes", cl, len(raw))
	}
	mr := multipart.NewReader(bytes.NewReader(raw), params["boundary"])
	var parts []part
	for {
		p, err := mr.NextPart()
		if err == io.EOF {
			return parts
		}
		if err != nil {
			t.Fatalf("part %d: %v", len(parts), err)
		}
		m := contentRangeRE.FindStringSubmatch(p.Header.Get("Content-Range"))
		if m == nil {
			t.Fatalf("part %d: Content-Range %q", len(parts), p.Header.Get("Content-Range"))
		}
		off, _ := strconv.ParseInt(m[1], 10, 64)
		end, _ := strconv.ParseInt(m[2], 10, 64)
		size, _ := strconv.ParseInt(m[3], 10, 64)
		data, err := io.ReadAll(p)
		if err != nil {
			t.Fatalf("part %d body: %v", len(parts), err)
		}
		parts = append(parts, part{off, end, size, data})
	}
}

func TestMultiRange(t *testing.T) {
	e := newEnv(t, Options{})
	const mib = 1 << 20
	size := 8*mib + 333 // nine pieces, the last one short
	data, dg := e.pushBlob("multi/blob", size)
	path := "/v2/multi/blob/blobs/" + dg

	// As stargz-snapshotter asks: no spaces, in its order, across piece
	// boundaries; then a suffix and a range cut at the end.
	asked := []struct{ off, end int64 }{
		{100, 4195},
		{2*mib - 10, 2*mib + 10},
		{int64(size) - 50, int64(size) - 1},
	}
	var spec []string
	for _, r := range asked {
		spec = append(spec, fmt.Sprintf("%d-%d", r.off, r.end))
	}
	resp := e.get(path, map[string]string{HeaderRegistry: "http://" + e.count.Addr, "Range": "bytes=" + strings.Join(spec, ",")})
	if resp.StatusCode != http.StatusPartialContent {
		t.Fatalf("status %d, want 206", resp.StatusCode)
	}
	if resp.Header.Get("Content-Range") != "" {
		t.Errorf("a multipart answer has Content-Range %q", resp.Header.Get("Content-Range"))
	}
	parts := readParts(t, resp)
	if len(parts) != len(asked) {
		t.Fatalf("%d parts, want %d", len(parts), len(asked))
	}
	for i, p := range parts {
		if p.off != asked[i].off || p.end != asked[i].end || p.size != int64(size) {
			t.Errorf("part %d: bytes %d-%d/%d, want %d-%d/%d", i, p.off, p.end, p.size, asked[i].off, asked[i].end, size)
		}
		if !bytes.Equal(p.data, data[p.off:p.end+1]) {
			t.Errorf("part %d: wrong bytes (%d of them)", i, len(p.data))
		}
	}
	// Only the pieces under the ranges came from the origin: 0, 1, 2 and 8.
	if got, want := e.count.BlobBytes(dg), int64(3*mib+(size-8*mib)); got != want {
		t.Errorf("the origin sent %d bytes, want the %d of the covering pieces", got, want)
	}

	// The ns form, RFC 9110's spacing, a suffix and an unsatisfiable
	// range dropped; every byte now comes from the peer's storage.
	before := e.count.BlobBytes(dg)
	resp = e.get(path+"?ns="+e.reg.Addr, map[string]string{"Range": fmt.Sprintf("bytes=0-9, -5, %d-", size+1)})
	if resp.StatusCode != http.StatusPartialContent {
		t.Fatalf("?ns=: status %d", resp.StatusCode)
	}
	parts = readParts(t, resp)
	if len(parts) != 2 || !bytes.Equal(parts[0].data, data[:10]) || !bytes.Equal(parts[1].data, data[size-5:]) ||
		parts[1].off != int64(size-5) || parts[1].end != int64(size-1) {
		t.Fatalf("?ns=: parts %+v", parts)
	}
	if e.count.BlobBytes(dg) != before {
		t.Error("held pieces were fetched again")
	}
	if got := e.requests("p2p"); got != 2 {
		t.Errorf("p2p requests = %v, want 2", got)
	}

	// None satisfiable: 416.
	resp = e.get(path+"?ns="+e.reg.Addr, map[string]string{"Range": fmt.Sprintf("bytes=%d-,%d-%d", size, size+10, size+20)})
	body(t, resp)
	if resp.StatusCode != http.StatusRequestedRangeNotSatisfiable || resp.Header.Get("Content-Range") != fmt.Sprintf("bytes */%d", size) {
		t.Fatalf("unsatisfiable set: status %d, Content-Range %q", resp.StatusCode, resp.Header.Get("Content-Range"))
	}
}

// TestMultiRangeOriginRefusal: the origin's refusal of a multi-range
// request is relayed with its status, as for one range.
func TestMultiRangeOriginRefusal(t *testing.T) {
	e := newEnv(t, Options{})
	missing := digestOf([]byte("never pushed"))
	resp := e.get("/v2/multi/none/blobs/"+missing+"?ns="+e.reg.Addr, map[string]string{"Range": "bytes=0-1,5-6"})
	b := body(t, resp)
	if resp.StatusCode != http.StatusNotFound || !strings.Contains(string(b), "BLOB_UNKNOWN") {
		t.Fatalf("status %d, body %q; want 404 BLOB_UNKNOWN", resp.StatusCode, b)
	}
}

func TestMultipartLength(t *testing.T) {
	for _, rs := range [][]byteRange{{{0, 1}, {5, 10}}, {{0, 0}}, {{100, 1 << 20}, {0, 1}, {7, 7}}} {
		var buf bytes.Buffer
		mw := multipart.NewWriter(&buf)
		const boundary = "0123456789abcdef0123456789abcdef"
		_ = mw.SetBoundary(boundary)
		for _, br := range rs {
			pw, _ := mw.CreatePart(partHeader(br, 1<<21))
			pw.Write(make([]byte, br.n))
		}
		mw.Close()
		if got := multipartLength(boundary, rs, 1<<21); got != int64(buf.Len()) {
			t.Errorf("%v: length %d, written %d", rs, got, buf.Len())
		}
	}
}
