// Package proxy is starlingd's HTTP proxy and registry mirror, compatible
// with what Dragonfly's users configure. A request with no host in its URI
// is a mirror request: its upstream is the X-Dragonfly-Registry header, else
// containerd's ns query parameter, else the configured default registry. A
// request in proxy form (an absolute URI) is for that URL. GETs whose
// upstream URL matches a rule go through the P2P network; everything else
// (manifests, HEAD, pushes) goes straight to the upstream.
//
// It is no open proxy: every upstream, however named, must be an allowed
// registry (pkg/allow, checked again at dial time), CONNECT is off unless
// configured, and what P2P and the node's storage hold is served only to
// a client the origin said may read it (auth.go). A registry blob's task
// is its digest at its registry (RegistryTaskID), so that another
// upstream's bytes never reach a ranged read.
package proxy

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"regexp"
	"sort"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/starling-dev/starling/pkg/allow"
	"github.com/starling-dev/starling/pkg/config"
	"github.com/starling-dev/starling/pkg/peer"
	"github.com/starling-dev/starling/pkg/registry"
	"github.com/starling-dev/starling/pkg/taskid"
)

// Headers the proxy reads from clients, as Dragonfly's dfdaemon does.
const (
	// HeaderRegistry names the upstream of a mirror request: a URL such as
	// https://reg.example:5000.
	HeaderRegistry = "X-Dragonfly-Registry"
	// HeaderTag separates tasks of the same URL (taskid.ForURL's tag).
	HeaderTag = "X-Dragonfly-Tag"
	// HeaderUseP2P set to "true" sends a GET through P2P whatever the rules say.
	HeaderUseP2P = "X-Dragonfly-Use-P2P"
	// HeaderFilter lists extra volatile query parameters, separated by &.
	HeaderFilter = "X-Dragonfly-Filter"
	// HeaderTask is set on P2P answers: the task ID that served them.
	HeaderTask = "X-Starling-Task"
)

// dockerHub is where containerd and Docker send docker.io's API requests.
const dockerHub = "registry-1.docker.io"

// Options configures a Proxy.
type Options struct {
	// Rules are regular expressions matched against the upstream URL; a GET
	// that matches one goes through P2P. nil means config.DefaultProxy's;
	// an empty list sends everything straight to the upstream.
	Rules []string
	// DefaultRegistry is the upstream URL of mirror requests that name none.
	DefaultRegistry string
	// Prefetch makes a Range request start the whole blob in the background.
	Prefetch bool
	// QueryFilters are taskid.ForURL's filters (taskid.DefaultFilters when nil).
	QueryFilters []string
	// Scheme returns "http" or "https" for a registry host named by an ns
	// parameter; nil uses https, http for loopback hosts.
	Scheme func(host string) string
	// Transport carries direct requests and the authorisation checks; nil
	// is http.DefaultTransport's settings without the environment's proxy
	// (which may be this one). An *http.Transport gets the allowlist's
	// DialContext.
	Transport http.RoundTripper
	// Allowed are the host patterns of the upstreams clients may name
	// (allow.New); DefaultRegistry's host is always allowed. Every
	// other upstream is refused with 403.
	Allowed []string
	// Connect is "off" (CONNECT refused, the default) or "allowed"
	// (tunnels to allowed hosts on port 443).
	Connect string
	// AuthTTL is how long an origin's answer to a client's credentials
	// for a repository is reused (0: 60s).
	AuthTTL    time.Duration
	Logger     *slog.Logger
	Registerer prometheus.Registerer
}

// FromConfig returns the options of a proxy configured by c; a registry is
// reached over plain HTTP when the resolver section marks it insecure, or
// when it is on loopback (as the resolver and containerd do).
func FromConfig(c config.Proxy, resolver registry.Config) Options {
	return Options{
		Rules:           c.Rules,
		DefaultRegistry: c.DefaultRegistry,
		Prefetch:        c.Prefetch,
		QueryFilters:    c.QueryFilters,
		Allowed:         AllowedFromConfig(c, resolver),
		Connect:         c.Connect,
		// The one per-host policy of pkg/registry: loopback, insecure
		// hosts and mirrors are plain HTTP.
		Scheme: func(host string) string { return resolver.Endpoint(host).Scheme() },
	}
}

// AllowedFromConfig is the allowlist of a node: the registries its
// resolver section names, those containerd's hosts directory names, the
// proxy's default registry and proxy.allowed_registries. The resolver's
// mirrors are not in it: they are usually this very proxy.
func AllowedFromConfig(c config.Proxy, resolver registry.Config) []string {
	var out []string
	for h := range resolver.Host {
		out = append(out, h)
	}
	if c.HostsDir != "" {
		// One directory per registry ("_default" is no host).
		ents, _ := os.ReadDir(c.HostsDir)
		for _, e := range ents {
			if e.IsDir() && e.Name() != "_default" {
				out = append(out, e.Name())
			}
		}
	}
	sort.Strings(out)
	if c.DefaultRegistry != "" {
		out = append(out, c.DefaultRegistry)
	}
	return append(out, c.AllowedRegistries...)
}

// Proxy is the proxy and mirror; it is an http.Handler.
type Proxy struct {
	o       Options
	p       *peer.Peer
	rules   []*regexp.Regexp
	def     *url.URL
	log     *slog.Logger
	m       *metrics
	direct  *httputil.ReverseProxy
	filters []string
	scheme  func(string) string
	allow   *allow.List
	auth    *authChecker
	// connectPort is the one port CONNECT reaches: 443 (tests change it).
	connectPort string
}

// New returns a proxy that sends P2P requests to p. A nil p sends
// everything straight to the upstream.
func New(o Options, p *peer.Peer) (*Proxy, error) {
	d := config.DefaultProxy()
	if o.Rules == nil {
		o.Rules = d.Rules
	}
	if o.DefaultRegistry == "" {
		o.DefaultRegistry = d.DefaultRegistry
	}
	if o.QueryFilters == nil {
		o.QueryFilters = taskid.DefaultFilters
	}
	if o.Scheme == nil {
		o.Scheme = func(host string) string { return registry.Config{}.Endpoint(host).Scheme() }
	}
	switch o.Connect {
	case "":
		o.Connect = d.Connect
	case "off", "allowed":
	default:
		return nil, fmt.Errorf("proxy connect %q: want off or allowed", o.Connect)
	}
	al, err := allow.New(append([]string{o.DefaultRegistry}, o.Allowed...))
	if err != nil {
		return nil, fmt.Errorf("proxy: %w", err)
	}
	if o.Transport == nil {
		t := http.DefaultTransport.(*http.Transport).Clone()
		t.Proxy = nil
		o.Transport = t
	}
	if t, ok := o.Transport.(*http.Transport); ok {
		// Checked at dial time too: a name that passed the host check
		// may resolve, or be rebound, to an internal address.
		t = t.Clone()
		t.DialContext = al.DialContext
		t.DialTLSContext = nil
		o.Transport = t
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.Registerer == nil {
		o.Registerer = prometheus.NewRegistry()
	}
	x := &Proxy{o: o, p: p, log: o.Logger.With("component", "proxy"), filters: o.QueryFilters, scheme: o.Scheme, allow: al, connectPort: "443"}
	x.auth = newAuthChecker(o.Transport, o.AuthTTL)
	for _, r := range o.Rules {
		re, err := regexp.Compile(r)
		if err != nil {
			return nil, fmt.Errorf("proxy rule %q: %w", r, err)
		}
		x.rules = append(x.rules, re)
	}
	var def *url.URL
	def, err = registryURL(o.DefaultRegistry)
	if err != nil {
		return nil, fmt.Errorf("proxy default registry: %w", err)
	}
	x.def = def
	if x.m, err = newMetrics(o.Registerer); err != nil {
		return nil, fmt.Errorf("proxy metrics: %w", err)
	}
	x.direct = x.newDirect()
	return x, nil
}

// registryURL parses an upstream given as a URL (http or https, a host, an
// optional path prefix).
func registryURL(s string) (*url.URL, error) {
	u, err := url.Parse(s)
	if err != nil {
		return nil, fmt.Errorf("registry URL %q: %w", s, err)
	}
	if (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("registry URL %q: want http(s)://HOST[:PORT]", s)
	}
	u.Path = strings.TrimSuffix(u.Path, "/")
	u.RawPath, u.RawQuery, u.Fragment = "", "", ""
	return u, nil
}

// errBadUpstream is a request whose upstream cannot be worked out.
var errBadUpstream = errors.New("bad upstream")

// upstream returns the URL a request is for.
func (x *Proxy) upstream(r *http.Request) (*url.URL, error) {
	if r.URL.Host != "" {
		// Proxy form: the client named the URL.
		if r.URL.Scheme != "http" && r.URL.Scheme != "https" {
			return nil, fmt.Errorf("%w: scheme %q", errBadUpstream, r.URL.Scheme)
		}
		u := *r.URL
		return &u, nil
	}
	q := r.URL.Query()
	ns := q.Get("ns")
	var base *url.URL
	switch h := r.Header.Get(HeaderRegistry); {
	case h != "":
		u, err := registryURL(h)
		if err != nil {
			return nil, fmt.Errorf("%w: %s: %w", errBadUpstream, HeaderRegistry, err)
		}
		base = u
	case ns != "":
		if strings.ContainsAny(ns, "/?#@ ") {
			return nil, fmt.Errorf("%w: ns=%q is not a registry host", errBadUpstream, ns)
		}
		host := ns
		if host == "docker.io" {
			host = dockerHub
		}
		base = &url.URL{Scheme: x.scheme(host), Host: host}
	default:
		base = x.def
	}
	u := *base
	u.Path = base.Path + r.URL.Path
	u.RawPath = ""
	if r.URL.RawPath != "" {
		u.RawPath = base.Path + r.URL.RawPath
	}
	u.RawQuery = r.URL.RawQuery
	if q.Has("ns") {
		// ns names the registry for this mirror; the registry itself does
		// not know it.
		q.Del("ns")
		u.RawQuery = q.Encode()
	}
	return &u, nil
}

// p2p reports whether a request goes through the peer: a GET whose
// upstream URL matches a rule.
func (x *Proxy) p2p(r *http.Request, u *url.URL) bool {
	if x.p == nil || r.Method != http.MethodGet {
		return false
	}
	if r.Header.Get(HeaderUseP2P) == "true" {
		return true
	}
	s := u.String()
	for _, re := range x.rules {
		if re.MatchString(s) {
			return true
		}
	}
	return false
}

// ServeHTTP routes a request to P2P or straight to its upstream.
func (x *Proxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodConnect {
		if x.o.Connect != "allowed" {
			x.refuse(w, r, &allow.RefusedError{Target: r.Host, Reason: "CONNECT is off (proxy.connect)"})
			return
		}
		if _, port, _ := net.SplitHostPort(r.Host); port != x.connectPort {
			x.refuse(w, r, &allow.RefusedError{Target: r.Host, Reason: "CONNECT only to port " + x.connectPort})
			return
		}
		if err := x.allow.CheckHostPort(r.Host); err != nil {
			x.refuse(w, r, err)
			return
		}
		x.tunnel(w, r)
		return
	}
	u, err := x.upstream(r)
	if err != nil {
		x.log.Info("proxy request refused", "method", r.Method, "uri", r.RequestURI, "status", http.StatusBadRequest, "err", err)
		http.Error(w, oneLine(err), http.StatusBadRequest)
		return
	}
	if err := x.allow.CheckURL(u); err != nil {
		x.refuse(w, r, err)
		return
	}
	if x.log.Enabled(r.Context(), slog.LevelDebug) {
		// Without the query: presigned URLs carry their credentials there.
		x.log.Debug("proxy request", "method", r.Method, "url", u.Scheme+"://"+u.Host+u.EscapedPath(), "p2p", x.p2p(r, u), "range", r.Header.Get("Range"))
	}
	if x.p2p(r, u) {
		x.m.requests.WithLabelValues("p2p").Inc()
		x.serveP2P(w, r, u)
		return
	}
	x.m.requests.WithLabelValues("direct").Inc()
	x.serveDirect(w, r, u)
}

// hopHeaders are the hop-by-hop headers of RFC 9110 (and the old
// Proxy-Connection), never forwarded.
var hopHeaders = []string{
	"Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate",
	"Proxy-Authorization", "Te", "Trailer", "Transfer-Encoding", "Upgrade",
}

// removeHopHeaders deletes the hop-by-hop headers and those that
// Connection names.
func removeHopHeaders(h http.Header) {
	for _, v := range h.Values("Connection") {
		for _, f := range strings.Split(v, ",") {
			if f = strings.TrimSpace(f); f != "" {
				h.Del(f)
			}
		}
	}
	for _, k := range hopHeaders {
		h.Del(k)
	}
}

// logFailure logs one line for a request that did not succeed. A 401 is
// the first half of every token handshake and a HEAD's 404 is how clients
// ask whether something exists: those are logged at debug only.
func (x *Proxy) logFailure(r *http.Request, path string, status int, u *url.URL, err error) {
	lvl := slog.LevelInfo
	switch {
	case status == http.StatusUnauthorized, r.Method == http.MethodHead && status == http.StatusNotFound:
		lvl = slog.LevelDebug
	case status >= 500 || status == 0:
		lvl = slog.LevelWarn
	}
	args := []any{"method", r.Method, "url", u.String(), "path", path, "status", status}
	if err != nil {
		args = append(args, "err", err)
	}
	x.log.Log(r.Context(), lvl, "proxy request failed", args...)
}

// refuse answers a request for an upstream the allowlist does not admit:
// 403, one line, one log line (without the query, which may carry
// signatures).
func (x *Proxy) refuse(w http.ResponseWriter, r *http.Request, err error) {
	x.m.refused.Inc()
	x.log.Warn("proxy request refused", "method", r.Method, "host", r.Host, "path", r.URL.Path,
		"remote", r.RemoteAddr, "status", http.StatusForbidden, "err", err)
	http.Error(w, "starling: "+oneLine(err), http.StatusForbidden)
}
