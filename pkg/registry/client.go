// Package registry is starling's client of the OCI distribution protocol:
// resolving references, reading and pushing blobs and manifests, and ranged
// reads of blobs. The protocol and the token flow are go-containerregistry's;
// this package adds what starling needs around them: per-host plain HTTP and
// TLS settings, mirrors with extra headers tried before the origin, retries
// that honour Retry-After, and a time bound on every request.
package registry

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
)

// Client talks to registries. It is safe for concurrent use.
type Client struct {
	cfg       Config
	keychain  authn.Keychain
	userAgent string
	base      http.RoundTripper

	mu     sync.Mutex
	authed map[string]http.RoundTripper // endpoint+repo+scope -> authenticated transport
	down   map[string]time.Time         // mirror host -> skipped until
}

// mirrorDownFor is how long a mirror that could not be reached is skipped,
// so that a dead mirror costs one timeout, not one per request.
const mirrorDownFor = 30 * time.Second

// Option changes a Client.
type Option func(*Client)

// WithPlainHTTP reaches every registry over plain HTTP (the CLI's --plain-http).
func WithPlainHTTP(on bool) Option {
	return func(c *Client) { c.cfg.PlainHTTP = c.cfg.PlainHTTP || on }
}

// WithKeychain replaces the default keychain (~/.docker/config.json, $DOCKER_CONFIG).
func WithKeychain(k authn.Keychain) Option { return func(c *Client) { c.keychain = k } }

// WithUserAgent sets the User-Agent of every request.
func WithUserAgent(ua string) Option { return func(c *Client) { c.userAgent = ua } }

// New returns a Client for cfg.
func New(cfg Config, opts ...Option) *Client {
	c := &Client{
		cfg:       cfg.withDefaults(),
		keychain:  authn.DefaultKeychain,
		userAgent: "starling",
		authed:    map[string]http.RoundTripper{},
		down:      map[string]time.Time{},
	}
	for _, o := range opts {
		o(c)
	}
	c.base = newBaseTransport(c.cfg)
	return c
}

// Config returns the client's configuration, defaults filled in.
func (c *Client) Config() Config { return c.cfg }

func (c *Client) plainHTTPAllowed(hostport string) bool { return c.cfg.Endpoint(hostport).PlainHTTP }

func (c *Client) nameOpts(hostport string) []name.Option {
	o := []name.Option{name.WeakValidation}
	if c.plainHTTPAllowed(hostport) {
		o = append(o, name.Insecure)
	}
	return o
}

// ParseReference parses an image reference (docker.io/library/x:tag, x@sha256:…).
func (c *Client) ParseReference(s string) (name.Reference, error) {
	ref, err := name.ParseReference(s, name.WeakValidation)
	if err != nil {
		return nil, fmt.Errorf("parse reference %q: %w", s, err)
	}
	return name.ParseReference(s, c.nameOpts(ref.Context().RegistryStr())...)
}

// ParseRepository parses a repository name (host/path).
func (c *Client) ParseRepository(s string) (name.Repository, error) {
	r, err := name.NewRepository(s, name.WeakValidation)
	if err != nil {
		return name.Repository{}, fmt.Errorf("parse repository %q: %w", s, err)
	}
	return name.NewRepository(s, c.nameOpts(r.RegistryStr())...)
}

// endpoint is a place a repository can be read from: a mirror or the origin.
type endpoint struct {
	repo   name.Repository
	header http.Header
	ns     string // the origin's host, sent as ?ns= to a mirror
	mirror bool
}

func (e endpoint) String() string {
	if e.mirror {
		return "mirror " + e.repo.RegistryStr()
	}
	return e.repo.RegistryStr()
}

// endpoints lists where repo can be read, mirrors first.
func (c *Client) endpoints(repo name.Repository) []endpoint {
	origin := repo.RegistryStr()
	hp := c.cfg.HostPolicy(origin)
	var eps []endpoint
	for _, m := range hp.Mirrors {
		reg, err := name.NewRegistry(m.Host, c.nameOpts(m.Host)...)
		if err != nil {
			continue
		}
		r := reg.Repo(repo.RepositoryStr())
		eps = append(eps, endpoint{repo: r, header: m.Header, ns: origin, mirror: true})
	}
	return append(eps, endpoint{repo: repo, header: hp.Origin.Header})
}

// transport returns an authenticated round tripper for ep with the given
// scope, cached so that a lazily read layer pays for the token once.
func (c *Client) transport(ctx context.Context, ep endpoint, scope string) (http.RoundTripper, error) {
	key := ep.repo.RegistryStr() + "|" + ep.repo.RepositoryStr() + "|" + scope + "|" + ep.ns
	c.mu.Lock()
	rt, ok := c.authed[key]
	c.mu.Unlock()
	if ok {
		return rt, nil
	}
	auth, err := c.keychain.Resolve(ep.repo.Registry)
	if err != nil {
		return nil, fmt.Errorf("credentials for %s: %w", ep.repo.RegistryStr(), err)
	}
	var inner http.RoundTripper = c.base
	if len(ep.header) > 0 || ep.ns != "" {
		inner = &headerTransport{inner: inner, host: ep.repo.RegistryStr(), header: ep.header, ns: ep.ns}
	}
	inner = transport.NewUserAgent(inner, c.userAgent)
	rt, err = transport.NewWithContext(ctx, ep.repo.Registry, auth, inner, []string{ep.repo.Scope(scope)})
	if err != nil {
		return nil, fmt.Errorf("connect to %s: %w", ep, err)
	}
	c.mu.Lock()
	c.authed[key] = rt
	c.mu.Unlock()
	return rt, nil
}

func (c *Client) remoteOpts(ctx context.Context, rt http.RoundTripper, extra ...remote.Option) []remote.Option {
	return append([]remote.Option{
		remote.WithContext(ctx),
		remote.WithTransport(rt),
		remote.WithUserAgent(c.userAgent),
		// Retries happen in the base transport, which honours Retry-After.
		remote.WithRetryBackoff(remote.Backoff{Steps: 1}),
		remote.WithRetryStatusCodes(),
		remote.WithJobs(4),
	}, extra...)
}

// tryEndpoints runs fn against each endpoint of repo in turn and returns the
// first success. An error that is the registry's answer about the thing
// itself (not found, unauthorized) from the origin ends the search.
func tryEndpoints[T any](ctx context.Context, c *Client, repo name.Repository, scope string, fn func(endpoint, http.RoundTripper) (T, error)) (T, error) {
	var zero T
	var errs []error
	for _, ep := range c.endpoints(repo) {
		if ep.mirror && c.mirrorDown(ep.repo.RegistryStr()) {
			continue
		}
		rt, err := c.transport(ctx, ep, scope)
		if err == nil {
			var v T
			v, err = fn(ep, rt)
			if err == nil {
				return v, nil
			}
		}
		if ctx.Err() != nil {
			return zero, err
		}
		var ne net.Error
		var oe *net.OpError
		if ep.mirror && (errors.As(err, &oe) || errors.As(err, &ne)) {
			c.markMirrorDown(ep.repo.RegistryStr())
		}
		errs = append(errs, err)
	}
	if len(errs) == 1 {
		return zero, errs[0]
	}
	return zero, errors.Join(errs...)
}

func (c *Client) mirrorDown(host string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return time.Now().Before(c.down[host])
}

func (c *Client) markMirrorDown(host string) {
	c.mu.Lock()
	c.down[host] = time.Now().Add(mirrorDownFor)
	c.mu.Unlock()
}

// Get fetches the manifest or index ref names.
func (c *Client) Get(ctx context.Context, ref name.Reference, opts ...remote.Option) (*remote.Descriptor, error) {
	return tryEndpoints(ctx, c, ref.Context(), transport.PullScope, func(ep endpoint, rt http.RoundTripper) (*remote.Descriptor, error) {
		return remote.Get(retarget(ref, ep.repo), c.remoteOpts(ctx, rt, opts...)...)
	})
}

// Head returns the descriptor of the manifest or index ref names.
func (c *Client) Head(ctx context.Context, ref name.Reference) (*v1.Descriptor, error) {
	return tryEndpoints(ctx, c, ref.Context(), transport.PullScope, func(ep endpoint, rt http.RoundTripper) (*v1.Descriptor, error) {
		return remote.Head(retarget(ref, ep.repo), c.remoteOpts(ctx, rt)...)
	})
}

// Image resolves ref to an image, picking platform from an index (nil: the host's).
func (c *Client) Image(ctx context.Context, ref name.Reference, platform *v1.Platform) (v1.Image, error) {
	var extra []remote.Option
	if platform != nil {
		extra = append(extra, remote.WithPlatform(*platform))
	}
	d, err := c.Get(ctx, ref, extra...)
	if err != nil {
		return nil, err
	}
	return d.Image()
}

// Layer returns a lazily fetched layer of repo by its digest.
func (c *Client) Layer(ctx context.Context, repo name.Repository, h v1.Hash) (v1.Layer, error) {
	return tryEndpoints(ctx, c, repo, transport.PullScope, func(ep endpoint, rt http.RoundTripper) (v1.Layer, error) {
		l, err := remote.Layer(ep.repo.Digest(h.String()), c.remoteOpts(ctx, rt)...)
		if err != nil {
			return nil, err
		}
		// remote.Layer is lazy; ask for the size now so a dead endpoint is skipped.
		if _, err := l.Size(); err != nil {
			return nil, err
		}
		return l, nil
	})
}

// BlobURL is the origin URL of a blob.
func BlobURL(repo name.Repository, h v1.Hash) string {
	return fmt.Sprintf("%s://%s/v2/%s/blobs/%s", repo.Scheme(), repo.RegistryStr(), repo.RepositoryStr(), h)
}

func (c *Client) blobRequest(ctx context.Context, ep endpoint, rt http.RoundTripper, method string, h v1.Hash, rng string) (*http.Response, error) {
	u := BlobURL(ep.repo, h)
	req, err := http.NewRequestWithContext(ctx, method, u, nil)
	if err != nil {
		return nil, err
	}
	if rng != "" {
		req.Header.Set("Range", rng)
	}
	resp, err := (&http.Client{Transport: rt}).Do(req)
	if err != nil {
		return nil, fmt.Errorf("%s blob %s from %s: %w", strings.ToLower(method), h, ep, err)
	}
	if err := transport.CheckError(resp, http.StatusOK, http.StatusPartialContent); err != nil {
		resp.Body.Close()
		return nil, fmt.Errorf("%s blob %s from %s: %w", strings.ToLower(method), h, ep, err)
	}
	return resp, nil
}

// OpenBlob streams a whole blob.
func (c *Client) OpenBlob(ctx context.Context, repo name.Repository, h v1.Hash) (io.ReadCloser, error) {
	return tryEndpoints(ctx, c, repo, transport.PullScope, func(ep endpoint, rt http.RoundTripper) (io.ReadCloser, error) {
		resp, err := c.blobRequest(ctx, ep, rt, http.MethodGet, h, "")
		if err != nil {
			return nil, err
		}
		return resp.Body, nil
	})
}

// BlobSize asks a registry for a blob's size with HEAD.
func (c *Client) BlobSize(ctx context.Context, repo name.Repository, h v1.Hash) (int64, error) {
	return tryEndpoints(ctx, c, repo, transport.PullScope, func(ep endpoint, rt http.RoundTripper) (int64, error) {
		resp, err := c.blobRequest(ctx, ep, rt, http.MethodHead, h, "")
		if err != nil {
			return 0, err
		}
		resp.Body.Close()
		if resp.ContentLength < 0 {
			return 0, fmt.Errorf("head blob %s from %s: no Content-Length", h, ep)
		}
		return resp.ContentLength, nil
	})
}

// ErrRangeUnsupported is returned when a registry answers a Range request
// with the whole blob.
var ErrRangeUnsupported = errors.New("registry ignored the Range header")

// BlobRange streams length bytes of a blob from off. A length below zero reads
// to the end. The answer must be a 206 whose Content-Range starts at off.
func (c *Client) BlobRange(ctx context.Context, repo name.Repository, h v1.Hash, off, length int64) (io.ReadCloser, error) {
	if off < 0 || length == 0 {
		return nil, fmt.Errorf("read blob %s: bad range %d+%d", h, off, length)
	}
	rng := fmt.Sprintf("bytes=%d-", off)
	if length > 0 {
		rng = fmt.Sprintf("bytes=%d-%d", off, off+length-1)
	}
	return tryEndpoints(ctx, c, repo, transport.PullScope, func(ep endpoint, rt http.RoundTripper) (io.ReadCloser, error) {
		resp, err := c.blobRequest(ctx, ep, rt, http.MethodGet, h, rng)
		if err != nil {
			return nil, err
		}
		if resp.StatusCode != http.StatusPartialContent {
			resp.Body.Close()
			return nil, fmt.Errorf("read blob %s range %s from %s: %w", h, rng, ep, ErrRangeUnsupported)
		}
		start, err := contentRangeStart(resp.Header.Get("Content-Range"))
		if err != nil || start != off {
			resp.Body.Close()
			return nil, fmt.Errorf("read blob %s range %s from %s: answer has Content-Range %q", h, rng, ep, resp.Header.Get("Content-Range"))
		}
		if length > 0 {
			return struct {
				io.Reader
				io.Closer
			}{io.LimitReader(resp.Body, length), resp.Body}, nil
		}
		return resp.Body, nil
	})
}

func contentRangeStart(v string) (int64, error) {
	// bytes 100-199/1000
	v = strings.TrimPrefix(v, "bytes ")
	dash := strings.IndexByte(v, '-')
	if dash < 0 {
		return 0, fmt.Errorf("bad Content-Range %q", v)
	}
	return strconv.ParseInt(v[:dash], 10, 64)
}

// BlobReaderAt is random access to one blob: each ReadAt is one ranged
// request through BlobRange, with the client's auth, mirrors, retries and
// deadlines. It serves readers that want an io.ReaderAt (a TOC and footer
// read); reads of chunks go through BlobRange directly.
type BlobReaderAt struct {
	// ctx bounds every ReadAt, which io.ReaderAt gives no other way to pass.
	ctx  context.Context
	c    *Client
	repo name.Repository
	h    v1.Hash
}

// NewBlobReaderAt returns random access to blob h of repo; ctx bounds every read.
func (c *Client) NewBlobReaderAt(ctx context.Context, repo name.Repository, h v1.Hash) *BlobReaderAt {
	return &BlobReaderAt{ctx: ctx, c: c, repo: repo, h: h}
}

// ReadAt reads len(p) bytes at off in one request. When the registry
// answers a range over the end of the blob with the bytes there are, they
// are returned with io.EOF; some registries refuse such a range instead.
func (r *BlobReaderAt) ReadAt(p []byte, off int64) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	rc, err := r.c.BlobRange(r.ctx, r.repo, r.h, off, int64(len(p)))
	if err != nil {
		return 0, err
	}
	defer rc.Close()
	n, err := io.ReadFull(rc, p)
	switch {
	case errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF):
		return n, io.EOF
	case err != nil:
		return n, fmt.Errorf("read blob %s at %d: %w", r.h, off, err)
	}
	return n, nil
}

// pushOpts returns options for writing to ref's repository at the origin;
// mirrors are read-only.
func (c *Client) pushOpts(ctx context.Context, repo name.Repository, extra ...remote.Option) ([]remote.Option, error) {
	rt, err := c.transport(ctx, endpoint{repo: repo, header: c.cfg.Endpoint(repo.RegistryStr()).Header}, transport.PushScope)
	if err != nil {
		return nil, err
	}
	return c.remoteOpts(ctx, rt, extra...), nil
}

// Write pushes an image or index and its blobs to ref. go-containerregistry
// uploads every blob before the manifest, so an interrupted push never leaves
// a manifest pointing at missing blobs.
func (c *Client) Write(ctx context.Context, ref name.Reference, t remote.Taggable, extra ...remote.Option) error {
	opts, err := c.pushOpts(ctx, ref.Context(), extra...)
	if err != nil {
		return err
	}
	switch v := t.(type) {
	case v1.ImageIndex:
		return remote.WriteIndex(ref, v, opts...)
	case v1.Image:
		return remote.Write(ref, v, opts...)
	default:
		return remote.Put(ref, t, opts...)
	}
}

// WriteLayer uploads one blob to repo.
func (c *Client) WriteLayer(ctx context.Context, repo name.Repository, l v1.Layer, extra ...remote.Option) error {
	opts, err := c.pushOpts(ctx, repo, extra...)
	if err != nil {
		return err
	}
	return remote.WriteLayer(repo, l, opts...)
}

// Options returns go-containerregistry options that read repo from its first
// reachable endpoint, for callers that need the library directly.
func (c *Client) Options(ctx context.Context, repo name.Repository) ([]remote.Option, error) {
	var errs []error
	for _, ep := range c.endpoints(repo) {
		rt, err := c.transport(ctx, ep, transport.PullScope)
		if err == nil {
			return c.remoteOpts(ctx, rt), nil
		}
		errs = append(errs, err)
	}
	return nil, errors.Join(errs...)
}

// retarget moves ref to another repository (a mirror's), keeping tag or digest.
func retarget(ref name.Reference, repo name.Repository) name.Reference {
	if ref.Context() == repo {
		return ref
	}
	switch r := ref.(type) {
	case name.Digest:
		return repo.Digest(r.DigestStr())
	case name.Tag:
		return repo.Tag(r.TagStr())
	}
	return ref
}
