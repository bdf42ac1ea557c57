package testenv

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Network is a set of hosts, each in its own network namespace, joined by
// veth pairs to a bridge in a "switch" namespace. Nothing of it touches the
// test machine's own namespace: the test process reaches a host through
// Host.Listen, Host.DialContext and Host.HTTPClient, which open their sockets
// inside the host's namespace.
type Network struct {
	// Switch is the namespace holding the bridge.
	Switch string
	// Rate is the tc rate each host's link is limited to in both directions
	// ("" for unlimited).
	Rate string
	// Subnet is the network's /24, as "10.232.N".
	Subnet string

	t     testing.TB
	base  string
	hosts []*Host
}

// Host is one namespace of a Network.
type Host struct {
	// Name is the name given to AddHost.
	Name string
	// NS is the network namespace's name (for `ip netns exec` and StartIn).
	NS string
	// IP is the host's address on the network.
	IP string

	n *Network
}

// netSeq tells apart the networks of one test process.
var netSeq atomic.Int32

// NewNetwork creates an empty network. prefix (a few letters) names its
// namespaces "<prefix>-<pid>-<seq>-..." so that the namespaces a crashed run
// left behind can be recognised and are removed here; rate limits every
// host's upload and download (tc syntax: "400mbit"; "" for unlimited).
// Everything is removed when the test ends, also when it fails.
func NewNetwork(t testing.TB, prefix, rate string) *Network {
	t.Helper()
	Require(t, "ip", "tc")
	if strings.ContainsAny(prefix, "-/ ") || prefix == "" {
		t.Fatalf("network prefix %q: want a few letters", prefix)
	}
	if rate != "" {
		if _, err := ParseRate(rate); err != nil {
			t.Fatal(err)
		}
	}
	removeStaleNamespaces(prefix)
	seq := netSeq.Add(1)
	pid := os.Getpid()
	n := &Network{
		Rate: rate,
		// The namespaces are isolated from the machine's, so the subnet only
		// has to differ from test/lazy's 10.231.77.0/24 to avoid confusion
		// when reading logs; pid and seq spread concurrent runs anyway.
		Subnet: fmt.Sprintf("10.232.%d", (pid+int(seq))%256),
		t:      t,
		base:   fmt.Sprintf("%s-%d-%d", prefix, pid, seq),
	}
	n.Switch = n.base + "-sw"
	t.Cleanup(n.remove)
	n.run("ip", "netns", "add", n.Switch)
	n.run("ip", "-n", n.Switch, "link", "set", "lo", "up")
	// No STP: ports forward as soon as they are up.
	n.run("ip", "-n", n.Switch, "link", "add", "br0", "type", "bridge", "stp_state", "0")
	n.run("ip", "-n", n.Switch, "link", "set", "br0", "up")
	return n
}

// AddHost creates a host namespace with loopback up and an address on the
// network, linked to the switch by a veth pair shaped with tbf at both ends
// (the host's end limits what it sends, the switch's end what it receives).
func (n *Network) AddHost(name string) *Host {
	n.t.Helper()
	idx := len(n.hosts) + 2 // .1 stays free, as a gateway would have it
	if idx > 254 {
		n.t.Fatal("network full: at most 253 hosts")
	}
	h := &Host{Name: name, NS: fmt.Sprintf("%s-%d", n.base, idx), IP: fmt.Sprintf("%s.%d", n.Subnet, idx), n: n}
	n.hosts = append(n.hosts, h)
	swIf := "v" + strconv.Itoa(idx)
	n.run("ip", "netns", "add", h.NS)
	n.run("ip", "-n", h.NS, "link", "set", "lo", "up")
	// Created in the switch's namespace with the other end moved straight
	// into the host's, so no interface ever appears in the machine's namespace.
	n.run("ip", "-n", n.Switch, "link", "add", swIf, "type", "veth", "peer", "name", "eth0", "netns", h.NS)
	n.run("ip", "-n", n.Switch, "link", "set", swIf, "master", "br0")
	n.run("ip", "-n", n.Switch, "link", "set", swIf, "up")
	n.run("ip", "-n", h.NS, "addr", "add", h.IP+"/24", "dev", "eth0")
	n.run("ip", "-n", h.NS, "link", "set", "eth0", "up")
	if n.Rate != "" {
		burst, limit := tbfSizes(n.Rate)
		for _, c := range [][]string{
			{"ip", "netns", "exec", n.Switch, "tc", "qdisc", "add", "dev", swIf, "root", "tbf", "rate", n.Rate, "burst", burst, "limit", limit},
			{"ip", "netns", "exec", h.NS, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", n.Rate, "burst", burst, "limit", limit},
		} {
			n.run(c[0], c[1:]...)
		}
	}
	return h
}

// Hosts returns the hosts in the order they were added.
func (n *Network) Hosts() []*Host { return append([]*Host(nil), n.hosts...) }

func (n *Network) run(name string, args ...string) {
	n.t.Helper()
	Run(n.t, name, args...)
}

// remove deletes the namespaces; the veth pairs and the bridge go with them.
func (n *Network) remove() {
	ctx := context.Background()
	for _, h := range n.hosts {
		_, _ = RunErr(ctx, "ip", "netns", "del", h.NS)
	}
	_, _ = RunErr(ctx, "ip", "netns", "del", n.Switch)
}

// removeStaleNamespaces deletes "<prefix>-<pid>-..." namespaces whose pid is
// no longer a running process: leftovers of a run that was killed before its
// cleanup. Namespaces of live processes (a concurrent run) are left alone.
func removeStaleNamespaces(prefix string) {
	out, err := RunErr(context.Background(), "ip", "netns", "list")
	if err != nil {
		return
	}
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || !strings.HasPrefix(f[0], prefix+"-") {
			continue
		}
		rest := strings.TrimPrefix(f[0], prefix+"-")
		pidStr, _, ok := strings.Cut(rest, "-")
		pid, err := strconv.Atoi(pidStr)
		if !ok || err != nil || pid == os.Getpid() {
			continue
		}
		if err := syscall.Kill(pid, 0); err == nil || err == syscall.EPERM {
			continue
		}
		_, _ = RunErr(context.Background(), "ip", "netns", "del", f[0])
	}
}

// tbfSizes picks tbf's bucket and queue for rate: the bucket must hold at
// least a timer tick of traffic (else the link runs slower than rate) and a
// few full-sized GSO packets; the queue holds 50 ms, as `latency 50ms` would.
func tbfSizes(rate string) (burst, limit string) {
	bps, _ := ParseRate(rate)
	b := max(bps/100, 128<<10) // 10 ms, at least 128 KiB
	l := max(bps/20, 2*b)
	return strconv.FormatInt(b, 10), strconv.FormatInt(l, 10)
}

// ParseRate converts a tc rate ("400mbit", "1gbit", "50mbps", "800kbit",
// "1000000bit") to bytes per second.
func ParseRate(rate string) (int64, error) {
	s := strings.ToLower(strings.TrimSpace(rate))
	units := []struct {
		suffix string
		mult   float64 // bytes per second per unit
	}{
		{"gbit", 1e9 / 8}, {"mbit", 1e6 / 8}, {"kbit", 1e3 / 8}, {"bit", 1.0 / 8},
		{"gbps", 1e9}, {"mbps", 1e6}, {"kbps", 1e3}, {"bps", 1},
	}
	for _, u := range units {
		if num, ok := strings.CutSuffix(s, u.suffix); ok {
			v, err := strconv.ParseFloat(num, 64)
			if err != nil || v <= 0 {
				break
			}
			return int64(v * u.mult), nil
		}
	}
	return 0, fmt.Errorf("rate %q: want a tc rate such as 400mbit", rate)
}

// Do runs f on an OS thread switched into the host's namespace. Sockets that
// f creates belong to the namespace for good, whichever thread uses them
// later. f must not start goroutines that expect to be in the namespace.
func (h *Host) Do(f func() error) error {
	errc := make(chan error, 1)
	// A goroutine of its own: if switching back fails, it exits with the
	// thread still locked, and the runtime throws that thread away rather
	// than let other goroutines run in the wrong namespace.
	go func() {
		runtime.LockOSThread()
		orig, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("open own network namespace: %w", err)
			return
		}
		defer unix.Close(orig)
		target, err := unix.Open("/run/netns/"+h.NS, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("open network namespace %s: %w", h.NS, err)
			return
		}
		defer unix.Close(target)
		if err := unix.Setns(target, unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("enter network namespace %s: %w", h.NS, err)
			return
		}
		ferr := f()
		if err := unix.Setns(orig, unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("leave network namespace %s: %w", h.NS, err)
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// Listen opens a listener inside the host's namespace ("tcp", ":5000" or
// "IP:port"). It is closed when the test ends.
func (h *Host) Listen(network, addr string) net.Listener {
	h.n.t.Helper()
	var l net.Listener
	err := h.Do(func() (err error) {
		l, err = net.Listen(network, addr)
		return err
	})
	if err != nil {
		h.n.t.Fatalf("listen on %s in %s: %v", addr, h.Name, err)
	}
	h.n.t.Cleanup(func() { _ = l.Close() })
	return l
}

// DialContext dials from inside the host's namespace. addr should hold an IP
// address: a name would be resolved from the machine's namespace.
func (h *Host) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	var c net.Conn
	err := h.Do(func() (err error) {
		// No Happy Eyeballs: its second attempt would open its socket on
		// another goroutine's thread, outside the namespace.
		d := net.Dialer{FallbackDelay: -1}
		c, err = d.DialContext(ctx, network, addr)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("dial %s from %s: %w", addr, h.Name, err)
	}
	return c, nil
}

// HTTPClient returns a client whose connections start in the host's
// namespace, so its requests come from the host. No timeout: bound requests
// with their context.
func (h *Host) HTTPClient() *http.Client {
	tr := &http.Transport{
		Proxy:               nil,
		DialContext:         h.DialContext,
		MaxIdleConnsPerHost: 16,
		IdleConnTimeout:     30 * time.Second,
		DisableCompression:  true,
	}
	h.n.t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr}
}

// Start runs a command inside the host's namespace (see StartIn).
func (h *Host) Start(t testing.TB, logName string, env []string, name string, args ...string) *Proc {
	t.Helper()
	return StartIn(t, h.NS, logName, env, name, args...)
}

// WaitTCP waits until addr accepts connections from this host; p, when not
// nil, is the process expected to listen, whose early exit fails the test.
func (h *Host) WaitTCP(t testing.TB, p *Proc, addr string, timeout time.Duration) {
	t.Helper()
	WaitFor(t, timeout, "listener on "+addr+" (from "+h.Name+")", func() bool {
		if p != nil && p.Exited() {
			t.Fatalf("%s exited before listening on %s:\n%s", p.Cmd.Path, addr, tail([]byte(p.Log()), 4000))
		}
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		defer cancel()
		c, err := h.DialContext(ctx, "tcp", addr)
		if err != nil {
			return false
		}
		c.Close()
		return true
	})
}
