package proxy

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
)

// tokenRegistry is a registry that wants a bearer token from its own
// /token endpoint, as Harbor and most private registries do. It records
// what reached it, so a test can tell which requests nydusd would have
// sent through the mirror.
type tokenRegistry struct {
	srv   *httptest.Server
	repo  string
	blob  []byte
	dg    string
	token string

	mu   sync.Mutex
	seen []string // "METHOD PATH auth=AUTH dragonfly=HDR range=RANGE"
}

func newTokenRegistry(t *testing.T, size int) *tokenRegistry {
	r := &tokenRegistry{repo: "nydus/app", blob: make([]byte, size), token: "good-token"}
	rand.Read(r.blob)
	r.dg = digestOf(r.blob)
	r.srv = httptest.NewServer(http.HandlerFunc(r.serve))
	t.Cleanup(r.srv.Close)
	return r
}

func (r *tokenRegistry) serve(w http.ResponseWriter, req *http.Request) {
	r.mu.Lock()
	r.seen = append(r.seen, fmt.Sprintf("%s %s auth=%s dragonfly=%s range=%s", req.Method, req.URL.Path,
		req.Header.Get("Authorization"), req.Header.Get(HeaderRegistry), req.Header.Get("Range")))
	r.mu.Unlock()
	if req.URL.Path == "/token" {
		// nydusd sends service and scope both in the query and in a form
		// body, even on a GET.
		q := req.URL.Query()
		if q.Get("service") != "fake" || q.Get("scope") != "repository:"+r.repo+":pull" {
			http.Error(w, "bad token request "+req.URL.RawQuery, http.StatusBadRequest)
			return
		}
		fmt.Fprintf(w, `{"token":%q,"expires_in":600}`, r.token)
		return
	}
	if req.Header.Get("Authorization") != "Bearer "+r.token {
		w.Header().Set("WWW-Authenticate", fmt.Sprintf(`Bearer realm="%s/token",service="fake",scope="repository:%s:pull"`, r.srv.URL, r.repo))
		w.WriteHeader(http.StatusUnauthorized)
		return
	}
	if req.URL.Path != "/v2/"+r.repo+"/blobs/"+r.dg {
		http.NotFound(w, req)
		return
	}
	w.Header().Set("Docker-Content-Digest", r.dg)
	http.ServeContent(w, req, "", time.Time{}, bytes.NewReader(r.blob))
}

func (r *tokenRegistry) log() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.seen...)
}

// nydusd is the client side of nydusd's registry backend with one mirror,
// replayed from storage/src/backend/{connection,registry}.rs (the versions
// that have auth_through): every request goes first to the mirror, with
// the mirror's headers and the URL's host replaced by the mirror's,
// except that with auth_through false a request without Authorization
// (the first one, and the token request) goes to the registry itself. A
// mirror answer below 500 is final; 401 makes nydusd fetch a token from
// the challenge's realm and try again.
type nydusd struct {
	t           *testing.T
	mirror      string // "http://127.0.0.1:4001"
	headers     map[string]string
	authThrough bool
	registry    string // scheme://host of the registry
	repo        string
	blob        string // the blob's digest
	auth        string // cached "Bearer ..."
	client      *http.Client
}

// call is Connection::call: form is the body nydusd sends with a token
// request (a GET with a form, as its get_token does).
func (n *nydusd) call(method, url string, hdr http.Header, form string) *http.Response {
	n.t.Helper()
	newReq := func(u string) *http.Request {
		var body io.Reader
		if form != "" {
			body = strings.NewReader(form)
		}
		req, _ := http.NewRequest(method, u, body)
		req.Header = hdr.Clone()
		if form != "" {
			req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		}
		return req
	}
	if n.authThrough || hdr.Get("Authorization") != "" {
		mu := n.mirror + url[strings.Index(url[len("http://"):], "/")+len("http://"):]
		req := newReq(mu)
		for k, v := range n.headers {
			req.Header.Set(k, v)
		}
		resp, err := n.client.Do(req)
		if err == nil && resp.StatusCode < 500 {
			return resp
		}
		if err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			n.t.Errorf("mirror answered %s %s with %d: %s", method, mu, resp.StatusCode, b)
		} else {
			n.t.Errorf("mirror: %s %s: %v", method, mu, err)
		}
	}
	resp, err := n.client.Do(newReq(url))
	if err != nil {
		n.t.Fatalf("%s %s: %v", method, url, err)
	}
	return resp
}

// request is RegistryReader::request: with the cached token, and on 401
// a new token from the challenge's realm.
func (n *nydusd) request(method, path string, hdr http.Header) *http.Response {
	n.t.Helper()
	url := n.registry + "/v2/" + n.repo + path
	if n.auth != "" {
		hdr.Set("Authorization", n.auth)
	}
	resp := n.call(method, url, hdr, "")
	if resp.StatusCode != http.StatusUnauthorized {
		return resp
	}
	resp.Body.Close()
	if hdr.Get("Authorization") != "" {
		// An expired token: ask again without it for the challenge.
		hdr.Del("Authorization")
		resp = n.call(method, url, hdr, "")
		resp.Body.Close()
	}
	realm, query := parseChallenge(n.t, resp.Header.Get("Www-Authenticate"))
	query += "&grant_type=password&username=&password=&client_id=nydus-registry-client"
	tr := n.call(http.MethodGet, realm+"?"+query, http.Header{}, query)
	var tok struct {
		Token string `json:"token"`
	}
	err := json.NewDecoder(tr.Body).Decode(&tok)
	tr.Body.Close()
	if tr.StatusCode != http.StatusOK || err != nil {
		n.t.Fatalf("token: status %d, %v", tr.StatusCode, err)
	}
	n.auth = "Bearer " + tok.Token
	hdr.Set("Authorization", n.auth)
	return n.call(method, url, hdr, "")
}

func parseChallenge(t *testing.T, h string) (realm, query string) {
	t.Helper()
	var q []string
	for _, kv := range strings.Split(strings.TrimPrefix(h, "Bearer "), ",") {
		k, v, _ := strings.Cut(kv, "=")
		v = strings.Trim(v, `"`)
		if k == "realm" {
			realm = v
		} else {
			q = append(q, k+"="+v)
		}
	}
	if realm == "" {
		t.Fatalf("no realm in WWW-Authenticate %q", h)
	}
	return realm, strings.Join(q, "&")
}

// readAt is RegistryReader::try_read: one range, bytes=OFF-END.
func (n *nydusd) readAt(off, length int64) []byte {
	n.t.Helper()
	hdr := http.Header{}
	hdr.Set("Range", fmt.Sprintf("bytes=%d-%d", off, off+length-1))
	resp := n.request(http.MethodGet, "/blobs/"+n.blob, hdr)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode/100 != 2 {
		n.t.Fatalf("read %d+%d: status %d, %v, %q", off, length, resp.StatusCode, err, b)
	}
	return b
}

func TestNydusdMirror(t *testing.T) {
	for _, authThrough := range []bool{false, true} {
		t.Run(fmt.Sprintf("auth_through=%v", authThrough), func(t *testing.T) {
			e := newEnv(t, Options{})
			reg := newTokenRegistry(t, 3<<20+77)
			n := &nydusd{
				t: t, mirror: e.srv.URL, authThrough: authThrough,
				headers:  map[string]string{HeaderRegistry: reg.srv.URL},
				registry: reg.srv.URL, repo: reg.repo, blob: reg.dg,
				client: &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }},
			}

			// blob_size: HEAD, then chunk reads as the cache asks for them.
			resp := n.request(http.MethodHead, "/blobs/"+reg.dg, http.Header{})
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Length") != fmt.Sprint(len(reg.blob)) {
				t.Fatalf("HEAD: status %d, Content-Length %q", resp.StatusCode, resp.Header.Get("Content-Length"))
			}
			for _, r := range [][2]int64{{0, 4096}, {1<<20 - 100, 200}, {int64(len(reg.blob)) - 77, 77}, {0, 4096}} {
				if got := n.readAt(r[0], r[1]); !bytes.Equal(got, reg.blob[r[0]:r[0]+r[1]]) {
					t.Fatalf("read %d+%d: wrong bytes", r[0], r[1])
				}
			}
			if got := e.requests("p2p"); got != 4 {
				t.Errorf("%v blob reads went through P2P, want 4", got)
			}

			// What reached the registry: never the mirror's header, and
			// every range with the token (the peer relays nydusd's).
			var tokens int
			for _, s := range reg.log() {
				if strings.Contains(s, "dragonfly=http") {
					t.Errorf("the mirror's header reached the registry: %s", s)
				}
				if strings.HasPrefix(s, "GET /token") {
					tokens++
				}
				if strings.HasPrefix(s, "GET /v2/") && strings.Contains(s, "range=bytes") && !strings.Contains(s, "auth=Bearer "+reg.token) {
					t.Errorf("a range reached the registry without the token: %s", s)
				}
			}
			if tokens != 1 {
				t.Errorf("%d token requests reached the registry, want 1", tokens)
			}
			// What went straight through the mirror: with auth_through the
			// HEAD without a token, the token request and the HEAD with
			// it; without, only the HEAD with the token.
			want := 1.0
			if authThrough {
				want = 3
			}
			if got := e.requests("direct"); got != want {
				t.Errorf("%v requests went straight through the mirror, want %v", got, want)
			}
			t.Logf("registry saw:\n%s", strings.Join(reg.log(), "\n"))
		})
	}
}

// TestNydusdExpiredToken: a token that expired is refused by the origin
// through the mirror with the registry's challenge (a status below 500, so
// nydusd does not fall back), and nydusd's new token then works.
func TestNydusdExpiredToken(t *testing.T) {
	e := newEnv(t, Options{})
	reg := newTokenRegistry(t, 2<<20)
	n := &nydusd{
		t: t, mirror: e.srv.URL, headers: map[string]string{HeaderRegistry: reg.srv.URL},
		registry: reg.srv.URL, repo: reg.repo, blob: reg.dg, auth: "Bearer expired", client: &http.Client{},
	}
	if got := n.readAt(100, 1000); !bytes.Equal(got, reg.blob[100:1100]) {
		t.Fatal("wrong bytes")
	}
	if n.auth != "Bearer "+reg.token {
		t.Fatalf("nydusd's token is %q, want the new one", n.auth)
	}
	var refused bool
	for _, s := range reg.log() {
		refused = refused || strings.Contains(s, "auth=Bearer expired")
	}
	if !refused {
		t.Fatalf("the expired token never reached the registry:\n%s", strings.Join(reg.log(), "\n"))
	}
}

// TestNydusdPingDefault: without ping_url nydusd checks HOST/v2 with no
// header at all; any status below 500 counts as healthy.
func TestNydusdPingDefault(t *testing.T) {
	reg := newTokenRegistry(t, 10)
	e := newEnv(t, Options{DefaultRegistry: reg.srv.URL})
	resp, err := http.Get(e.srv.URL + "/v2")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode >= 500 {
		t.Fatalf("GET /v2: %d, nydusd would take the mirror for down", resp.StatusCode)
	}
}
