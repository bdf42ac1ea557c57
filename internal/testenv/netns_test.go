package testenv

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os/exec"
	"strings"
	"testing"
	"time"
)

func TestParseRate(t *testing.T) {
	for in, want := range map[string]int64{
		"400mbit": 50_000_000, "1gbit": 125_000_000, "800kbit": 100_000,
		"8bit": 1, "50mbps": 50_000_000, "1.5mbit": 187_500,
	} {
		got, err := ParseRate(in)
		if err != nil || got != want {
			t.Errorf("ParseRate(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "fast", "mbit", "-1mbit", "10"} {
		if _, err := ParseRate(in); err == nil {
			t.Errorf("ParseRate(%q): want an error", in)
		}
	}
}

// Two hosts: a TCP echo from one to the other, an HTTP request across, a
// process started in a namespace, and the namespaces gone afterwards.
func TestNetwork(t *testing.T) {
	Require(t, "ip", "tc")
	// What a run killed before its cleanup would leave behind.
	stale := "stnt-2147483647-1-sw"
	Run(t, "ip", "netns", "add", stale)
	t.Cleanup(func() { _, _ = RunErr(context.Background(), "ip", "netns", "del", stale) })

	var names []string
	t.Run("hosts", func(t *testing.T) {
		n := NewNetwork(t, "stnt", "100mbit")
		if nsExists(t, stale) {
			t.Errorf("the stale namespace %s was not removed", stale)
		}
		a, b := n.AddHost("a"), n.AddHost("b")
		names = []string{n.Switch, a.NS, b.NS}
		if a.IP == b.IP || !strings.HasPrefix(a.IP, n.Subnet+".") {
			t.Fatalf("addresses %s, %s in %s", a.IP, b.IP, n.Subnet)
		}

		// Echo server in b, client in a.
		l := b.Listen("tcp", b.IP+":7000")
		go func() {
			for {
				c, err := l.Accept()
				if err != nil {
					return
				}
				go func() { defer c.Close(); _, _ = io.Copy(c, c) }()
			}
		}()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		c, err := a.DialContext(ctx, "tcp", b.IP+":7000")
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if got := c.LocalAddr().(*net.TCPAddr).IP.String(); got != a.IP {
			t.Errorf("connection from %s, want from a (%s)", got, a.IP)
		}
		fmt.Fprintf(c, "hello across\n")
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil || line != "hello across\n" {
			t.Fatalf("echo: %q, %v", line, err)
		}

		// Nothing of the network shows in the machine's namespace. (Dialing
		// would prove nothing: some sandboxes accept every outgoing connection.)
		if out, err := exec.Command("ip", "-o", "addr").CombinedOutput(); err != nil || strings.Contains(string(out), n.Subnet+".") {
			t.Errorf("the machine's namespace has an address in %s.0/24: %v\n%s", n.Subnet, err, out)
		}

		// HTTP from a to b, and a process in b reached from a.
		hl := b.Listen("tcp", ":8000")
		srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprint(w, r.RemoteAddr)
		})}
		go func() { _ = srv.Serve(hl) }()
		t.Cleanup(func() { _ = srv.Close() })
		resp, err := a.HTTPClient().Get("http://" + b.IP + ":8000/")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if !strings.HasPrefix(string(body), a.IP+":") {
			t.Errorf("request came from %q, want from %s", body, a.IP)
		}

		// A process started on a sees a's interface.
		p := a.Start(t, "ip-addr", nil, "ip", "-o", "-4", "addr", "show", "dev", "eth0")
		WaitFor(t, 10*time.Second, "ip addr in a", p.Exited)
		if !strings.Contains(p.Log(), " "+a.IP+"/24 ") {
			t.Errorf("a process started on a does not see a's address %s:\n%s", a.IP, p.Log())
		}
	})
	// Cleanup ran when the subtest ended.
	for _, ns := range names {
		if nsExists(t, ns) {
			t.Errorf("namespace %s still there after the test", ns)
		}
	}
}

func nsExists(t *testing.T, name string) bool {
	t.Helper()
	out, err := exec.Command("ip", "netns", "list").CombinedOutput()
	if err != nil {
		t.Fatalf("ip netns list: %v\n%s", err, out)
	}
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) > 0 && f[0] == name {
			return true
		}
	}
	return false
}
