// Package serve holds what every listener of starling's daemons needs
// against clients that hold connections open: an HTTP server with header
// and idle timeouts, and a listener that bounds connections per client
// address and in all. Without them one client with a few thousand idle
// connections runs a daemon out of file descriptors and nobody else is
// served (issue 11, finding 9).
package serve

import (
	"net"
	"net/http"
	"sync"
	"time"
)

// Limits bounds a listener's connections.
type Limits struct {
	// PerClient is the most connections one remote IP may hold open; the
	// ones over it are closed as soon as they are accepted. Peers need a
	// handful each; 64 leaves room for a busy node behind NAT.
	PerClient int
	// Total bounds all connections; over it new ones are closed at once.
	Total int
}

// DefaultLimits suit a daemon port that peers and local clients use.
var DefaultLimits = Limits{PerClient: 64, Total: 4096}

// HTTPServer returns an http.Server for h with the timeouts every starling
// listener uses: a client that sends no request within ReadHeaderTimeout,
// or keeps an idle connection past IdleTimeout, is disconnected. Bodies
// are not bounded here: uploads of large pieces take as long as they take.
func HTTPServer(h http.Handler) *http.Server {
	return &http.Server{
		Handler:           h,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       60 * time.Second,
		MaxHeaderBytes:    64 << 10,
	}
}

// Listen listens on the TCP address addr within limits.
func Listen(addr string, limits Limits) (net.Listener, error) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	return Limit(l, limits), nil
}

// Limit bounds the connections accepted from l.
func Limit(l net.Listener, limits Limits) net.Listener {
	if limits.PerClient <= 0 {
		limits.PerClient = DefaultLimits.PerClient
	}
	if limits.Total <= 0 {
		limits.Total = DefaultLimits.Total
	}
	return &limitListener{Listener: l, limits: limits, per: map[string]int{}}
}

type limitListener struct {
	net.Listener
	limits Limits

	mu    sync.Mutex
	total int
	per   map[string]int
}

// Accept returns the next connection within the limits; connections over
// them are closed here, so that Serve goes on accepting.
func (l *limitListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		ip := remoteIP(c)
		l.mu.Lock()
		over := l.total >= l.limits.Total || l.per[ip] >= l.limits.PerClient
		if !over {
			l.total++
			l.per[ip]++
		}
		l.mu.Unlock()
		if over {
			c.Close()
			continue
		}
		return &limitConn{Conn: c, l: l, ip: ip}, nil
	}
}

func (l *limitListener) release(ip string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.total--
	if l.per[ip]--; l.per[ip] <= 0 {
		delete(l.per, ip)
	}
}

func remoteIP(c net.Conn) string {
	if a, ok := c.RemoteAddr().(*net.TCPAddr); ok {
		return a.IP.String()
	}
	return c.RemoteAddr().String()
}

type limitConn struct {
	net.Conn
	l    *limitListener
	ip   string
	once sync.Once
}

func (c *limitConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { c.l.release(c.ip) })
	return err
}

// Unwrap gives the underlying connection (TLS and HTTP/2 look through).
func (c *limitConn) Unwrap() net.Conn { return c.Conn }
