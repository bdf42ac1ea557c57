// Package allow says which upstreams starling may fetch from: host
// patterns for the URLs clients and preheat requests name, and a check of
// every address at dial time, so that no pattern, redirect or DNS answer
// reaches loopback, link-local or cloud metadata addresses unless the
// operator named that host exactly.
package allow

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"slices"
	"strings"
	"time"
)

// RefusedError is an upstream the list does not admit. The proxy answers
// it 403; fetches through DialContext fail with it.
type RefusedError struct {
	Target string // the URL, host:port or address refused
	Reason string
}

func (e *RefusedError) Error() string {
	return "upstream " + e.Target + " not allowed: " + e.Reason
}

// List says which upstreams may be reached. Host patterns decide
// which URLs a client may name; at dial time every address is checked
// again, after resolution, so that a name that resolves (or is rebound)
// to loopback, link-local or a cloud metadata address is refused unless
// an entry names that host exactly. Redirect targets (blob storage behind
// a registry) are dialled under the address rule only: registries send
// clients to hosts nobody lists.
type List struct {
	entries  []allowEntry
	dialer   net.Dialer
	resolver *net.Resolver
}

type allowEntry struct {
	host string // lower case, no brackets; for a wildcard the suffix with its dot (".corp"), "" for "*"
	wild bool
	port string // "" the default ports, "*" any, else one port
}

// dockerAliases are the names of Docker Hub's registry: allowing one
// allows the others, as containerd and go-containerregistry use all three.
var dockerAliases = []string{"docker.io", "index.docker.io", "registry-1.docker.io"}

// New parses host patterns: "host", "host:port", "host:*",
// "*.domain" (any subdomain, not domain itself), "*" (any host; addresses
// are still checked). A URL (https://host:port/...) stands for its host.
func New(patterns []string) (*List, error) {
	a := &List{
		dialer:   net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second},
		resolver: net.DefaultResolver,
	}
	for _, p := range patterns {
		e, err := parseAllowEntry(p)
		if err != nil {
			return nil, err
		}
		if !e.wild && slices.Contains(dockerAliases, e.host) {
			for _, h := range dockerAliases {
				a.entries = append(a.entries, allowEntry{host: h, port: e.port})
			}
			continue
		}
		a.entries = append(a.entries, e)
	}
	return a, nil
}

func parseAllowEntry(p string) (allowEntry, error) {
	s := strings.TrimSpace(p)
	if i := strings.Index(s, "://"); i >= 0 {
		u, err := url.Parse(s)
		if err != nil || u.Host == "" {
			return allowEntry{}, fmt.Errorf("allowed registry %q: not a host pattern", p)
		}
		s = u.Host
	}
	s = strings.ToLower(strings.TrimSuffix(s, "/"))
	if s == "" || strings.ContainsAny(s, "/?#@ ") {
		return allowEntry{}, fmt.Errorf("allowed registry %q: not a host pattern", p)
	}
	var e allowEntry
	host := s
	if h, port, err := net.SplitHostPort(s); err == nil {
		host, e.port = h, port
		if port != "*" && !validPort(port) {
			return allowEntry{}, fmt.Errorf("allowed registry %q: bad port", p)
		}
	} else if strings.Count(s, ":") > 1 {
		// A bare IPv6 address.
		host = strings.Trim(s, "[]")
	}
	host = strings.TrimSuffix(host, ".")
	switch {
	case host == "*":
		e.wild = true
	case strings.HasPrefix(host, "*."):
		e.wild, e.host = true, host[1:]
		if strings.Contains(e.host[1:], "*") || len(e.host) < 2 {
			return allowEntry{}, fmt.Errorf("allowed registry %q: a wildcard is only a leading \"*.\"", p)
		}
	case strings.Contains(host, "*") || host == "":
		return allowEntry{}, fmt.Errorf("allowed registry %q: a wildcard is only a leading \"*.\"", p)
	default:
		e.host = host
	}
	return e, nil
}

func validPort(p string) bool {
	if p == "" || len(p) > 5 || strings.TrimLeft(p, "0123456789") != "" {
		return false
	}
	n := 0
	for _, c := range p {
		n = n*10 + int(c-'0')
	}
	return n > 0 && n < 65536
}

// normHost is a host as entries hold it: lower case, no brackets, no
// trailing dot.
func normHost(h string) string {
	return strings.TrimSuffix(strings.ToLower(strings.Trim(h, "[]")), ".")
}

// match returns whether host:port is admitted and whether an entry names
// the host exactly (which admits internal addresses too).
func (a *List) match(host, port string) (ok, exact bool) {
	host = normHost(host)
	for _, e := range a.entries {
		switch e.port {
		case "*":
		case "":
			if port != "80" && port != "443" {
				continue
			}
		default:
			if port != e.port {
				continue
			}
		}
		switch {
		case !e.wild:
			if host == e.host {
				return true, true
			}
		case e.host == "" || strings.HasSuffix(host, e.host):
			ok = true
		}
	}
	return ok, false
}

// metadataNames are cloud metadata services by name; their addresses are
// refused by address too.
var metadataNames = []string{"metadata.google.internal", "metadata.goog", "metadata", "instance-data", "instance-data.ec2.internal"}

// metadataAddrs are metadata and host-agent addresses outside the ranges
// internal() refuses anyway (169.254.169.254 is link-local).
var metadataAddrs = []netip.Addr{
	netip.MustParseAddr("fd00:ec2::254"),   // AWS IMDS over IPv6
	netip.MustParseAddr("100.100.100.200"), // Alibaba Cloud
	netip.MustParseAddr("168.63.129.16"),   // Azure wireserver
}

var nat64 = netip.MustParsePrefix("64:ff9b::/96")

// internal reports whether ip is an address no upstream named by a
// pattern may resolve to: loopback, link-local, unspecified, multicast,
// cloud metadata (also when reached over NAT64 or as an IPv4-mapped one).
func internal(ip netip.Addr) bool {
	ip = ip.Unmap()
	if nat64.Contains(ip) {
		b := ip.As16()
		ip = netip.AddrFrom4([4]byte{b[12], b[13], b[14], b[15]})
	}
	return ip.IsLoopback() || ip.IsLinkLocalUnicast() || ip.IsLinkLocalMulticast() ||
		ip.IsInterfaceLocalMulticast() || ip.IsMulticast() || ip.IsUnspecified() ||
		slices.Contains(metadataAddrs, ip)
}

// defaultPort is the port a URL of scheme reaches when it names none.
func defaultPort(scheme string) string {
	if scheme == "http" {
		return "80"
	}
	return "443"
}

// CheckURL refuses a URL the proxy may not fetch: another scheme, user
// information, or a host no pattern admits.
func (a *List) CheckURL(u *url.URL) error {
	if u.Scheme != "http" && u.Scheme != "https" {
		return &RefusedError{Target: u.Scheme + "://" + u.Host, Reason: "scheme " + u.Scheme}
	}
	target := u.Scheme + "://" + u.Host
	if u.User != nil {
		return &RefusedError{Target: target, Reason: "credentials in the URL"}
	}
	port := u.Port()
	if port == "" {
		port = defaultPort(u.Scheme)
	}
	return a.checkHost(target, u.Hostname(), port)
}

func (a *List) checkHost(target, host, port string) error {
	if host == "" {
		return &RefusedError{Target: target, Reason: "no host"}
	}
	ok, exact := a.match(host, port)
	if !ok {
		return &RefusedError{Target: target, Reason: "not an allowed registry"}
	}
	if exact {
		return nil
	}
	h := normHost(host)
	if slices.Contains(metadataNames, h) || h == "localhost" || strings.HasSuffix(h, ".localhost") {
		return &RefusedError{Target: target, Reason: "an internal name matched only by a wildcard"}
	}
	if ip, err := netip.ParseAddr(h); err == nil && internal(ip) {
		return &RefusedError{Target: target, Reason: "an internal address matched only by a wildcard"}
	}
	return nil
}

// CheckHostPort refuses host:port (a CONNECT target) unless a pattern
// admits it, by the rules of CheckURL.
func (a *List) CheckHostPort(hostport string) error {
	host, port, err := net.SplitHostPort(hostport)
	if err != nil {
		return &RefusedError{Target: hostport, Reason: "not HOST:PORT"}
	}
	return a.checkHost(hostport, host, port)
}

// DialContext dials addr after checking the addresses it resolves to: an
// internal one only when an entry names the host exactly. The address
// dialled is the one checked, so a name rebound between the check and the
// dial does not get through.
func (a *List) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", addr, err)
	}
	_, exact := a.match(host, port)
	h := normHost(host)
	if !exact && (slices.Contains(metadataNames, h) || h == "localhost" || strings.HasSuffix(h, ".localhost")) {
		return nil, &RefusedError{Target: addr, Reason: "an internal name"}
	}
	var ips []netip.Addr
	if ip, err := netip.ParseAddr(h); err == nil {
		ips = []netip.Addr{ip}
	} else {
		ips, err = a.resolver.LookupNetIP(ctx, "ip", host)
		if err != nil {
			return nil, fmt.Errorf("dial %s: %w", addr, err)
		}
	}
	var errs []error
	refused := 0
	for _, ip := range ips {
		ip = ip.Unmap()
		if (network == "tcp4" && !ip.Is4()) || (network == "tcp6" && !ip.Is6()) {
			continue
		}
		if !exact && internal(ip) {
			refused++
			continue
		}
		c, err := a.dialer.DialContext(ctx, network, net.JoinHostPort(ip.String(), port))
		if err == nil {
			return c, nil
		}
		errs = append(errs, err)
		if ctx.Err() != nil {
			break
		}
	}
	if len(errs) == 0 {
		if refused > 0 {
			return nil, &RefusedError{Target: addr, Reason: "resolves to an internal address"}
		}
		return nil, fmt.Errorf("dial %s: no address", addr)
	}
	return nil, errors.Join(errs...)
}
