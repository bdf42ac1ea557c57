package main

import (
	"bufio"
	"context"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/starling-dev/starling/pkg/config"
	"github.com/starling-dev/starling/pkg/peer"
	"github.com/starling-dev/starling/pkg/progress"
	"github.com/starling-dev/starling/pkg/taskid"
)

func init() { subcommands = append(subcommands, newGetCmd) }

// Headers for the local proxy, named as Dragonfly's: tagHeader carries
// --tag, so the proxy names the task as a standalone get would; useP2P
// asks for P2P whatever the proxy's URL rules say (they match registry
// blobs only by default, and get is for any URL).
const (
	tagHeader    = "X-Dragonfly-Tag"
	useP2PHeader = "X-Dragonfly-Use-P2P"
)

// proxyDialTimeout bounds the connection to the local proxy: it is on
// this host, so anything slower means it is not running.
const proxyDialTimeout = 3 * time.Second

// getOutput is what `get --output json` prints.
type getOutput struct {
	URL     string  `json:"url"`
	File    string  `json:"file"`
	Bytes   int64   `json:"bytes"`
	Digest  string  `json:"digest"`
	Seconds float64 `json:"seconds"`
	Via     string  `json:"via"`
}

type getOptions struct {
	outFile    string
	digest     string
	headers    []string
	proxy      string
	standalone bool
	schedulers []string
	tag        string
}

func newGetCmd() *cobra.Command {
	var o getOptions
	cmd := &cobra.Command{
		Use:   "get URL -O FILE",
		Short: "Download a URL through the P2P network",
		Long: `Download a URL through the P2P network: through the local starlingd's proxy
(--proxy, default the configuration's proxy.listen, 127.0.0.1:4001), or with
--standalone (or when that proxy is unreachable) through a short-lived peer
run inside this command, which asks the schedulers (--scheduler, default the
configuration's peer.schedulers) for parents and otherwise fetches from the
origin. Headers given with -H go to the origin, Authorization included.

The file is written next to FILE as FILE.partial-* and renamed only when it
is complete and, with --digest, verified; on any error or interrupt nothing
is left behind. A registry blob URL (/v2/NAME/blobs/sha256:...) is checked
against the digest it names even without --digest.`,
		Example: `  starling get https://example.com/big.iso -O big.iso
  starling get http://registry:5000/v2/app/blobs/sha256:4f5a... -O layer.tgz -H "Authorization: Bearer $TOKEN"
  starling get --standalone --scheduler sched1:8002,sched2:8002 URL -O - | tar xz
  starling get URL -O file --digest sha256:4f5a... --output json`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runGet(cmd, args[0], o)
		},
	}
	f := cmd.Flags()
	f.StringVarP(&o.outFile, "output-file", "O", "", `file to write ("-" for stdout)`)
	f.StringVar(&o.digest, "digest", "", "expected digest of the result, sha256:<hex> (or sha512:<hex>)")
	f.StringArrayVarP(&o.headers, "header", "H", nil, `header sent to the origin, "Key: Value" (repeatable)`)
	f.StringVar(&o.proxy, "proxy", "", "address of the local starlingd proxy (default: the configuration's proxy.listen, 127.0.0.1:4001)")
	f.BoolVar(&o.standalone, "standalone", false, "run a short-lived peer in this process instead of using starlingd")
	f.StringSliceVar(&o.schedulers, "scheduler", nil, "schedulers HOST:PORT[,HOST:PORT] for --standalone (default: the configuration's peer.schedulers; none: fetch from the origin)")
	f.StringVar(&o.tag, "tag", "", "task tag: downloads of the same URL with different tags are different tasks")
	_ = cmd.MarkFlagRequired("output-file")
	return cmd
}

func runGet(cmd *cobra.Command, rawURL string, o getOptions) (err error) {
	start := time.Now()
	ctx := cmd.Context()
	if ctx == nil {
		ctx = context.Background()
	}
	u, err := url.Parse(rawURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return fmt.Errorf("get %q: not an http:// or https:// URL", rawURL)
	}
	hdr, err := parseHeaders(o.headers)
	if err != nil {
		return err
	}
	// The digest a registry blob URL names is the task's own: the peer
	// checks the task against it. A --digest is the user's expectation and
	// is checked here only, so a typo never makes a peer discard a good task
	// and blame its parents.
	urlDigest, _ := taskid.RegistryDigest(u)
	want := o.digest
	if want == "" {
		want = urlDigest
	}
	// check hashes the result for want when want is not sha256, which is
	// hashed anyway for the output.
	var check hash.Hash
	if want != "" {
		if check, err = newDigester(want); err != nil {
			return fmt.Errorf("--digest: %w", err)
		}
	}
	sum := sha256.New()
	if strings.HasPrefix(want, "sha256:") {
		check = sum
	}
	cfg, err := loadConfig(cmd)
	if err != nil {
		return err
	}

	// The sink: stdout, or a partial file beside FILE renamed at the end.
	var (
		w       io.Writer
		partial *os.File
	)
	if o.outFile == "-" {
		w = cmd.OutOrStdout()
	} else {
		dir, base := filepath.Dir(o.outFile), filepath.Base(o.outFile)
		if partial, err = os.CreateTemp(dir, base+".partial-*"); err != nil {
			return fmt.Errorf("get %s: %w", rawURL, err)
		}
		defer func() {
			if err != nil {
				partial.Close()
				os.Remove(partial.Name())
			}
		}()
		w = partial
	}

	mode := progress.ModeFor(g.output, os.Stderr)
	if g.output == "json" {
		mode = progress.Quiet
	}
	prog := progress.New(cmd.ErrOrStderr(), mode)
	name := filepath.Base(u.Path)
	if name == "" || name == "/" || name == "." {
		name = u.Host
	}
	bar := prog.Task(rawURL, fmt.Sprintf("%.40s", name), 0)
	defer func() { bar.Done(err); prog.Wait() }()

	body, size, via, err := openGet(ctx, cmd, cfg, u, hdr, o)
	if err != nil {
		return fmt.Errorf("get %s: %w", rawURL, interrupted(ctx, err))
	}
	defer body.Close()
	if size >= 0 {
		bar.SetTotal(size)
	}

	sinks := []io.Writer{w, sum}
	if check != nil && check != sum {
		sinks = append(sinks, check)
	}
	n, err := io.Copy(io.MultiWriter(sinks...), bar.ProxyReader(body))
	if err != nil {
		return fmt.Errorf("get %s (via %s): %w", rawURL, via, interrupted(ctx, err))
	}
	if size >= 0 && n != size {
		return fmt.Errorf("get %s (via %s): got %d of %d bytes", rawURL, via, n, size)
	}
	got := "sha256:" + hex.EncodeToString(sum.Sum(nil))
	if check != nil {
		algo, _, _ := strings.Cut(want, ":")
		if have := algo + ":" + hex.EncodeToString(check.Sum(nil)); !strings.EqualFold(have, want) {
			return fmt.Errorf("get %s: digest mismatch: want %s, got %s", rawURL, want, have)
		}
	}
	if partial != nil {
		if err = partial.Chmod(0o644); err == nil {
			if err = partial.Sync(); err == nil {
				err = partial.Close()
			}
		}
		if err == nil {
			err = os.Rename(partial.Name(), o.outFile)
		}
		if err != nil {
			return fmt.Errorf("get %s: write %s: %w", rawURL, o.outFile, err)
		}
	}

	out := getOutput{URL: rawURL, File: o.outFile, Bytes: n, Digest: got, Seconds: time.Since(start).Seconds(), Via: via}
	if g.output == "json" {
		// With the data on stdout, the summary goes to stderr.
		jw := cmd.OutOrStdout()
		if o.outFile == "-" {
			jw = cmd.ErrOrStderr()
		}
		enc := json.NewEncoder(jw)
		enc.SetIndent("", "  ")
		return enc.Encode(out)
	}
	if o.outFile != "-" {
		fmt.Fprintf(cmd.OutOrStdout(), "%s: %d bytes, %s, via %s, in %.2fs\n", o.outFile, n, got, via, out.Seconds)
	}
	return nil
}

// openGet starts the download through the local proxy, or standalone when
// asked to or when the proxy does not answer.
func openGet(ctx context.Context, cmd *cobra.Command, cfg config.Daemon, u *url.URL, hdr http.Header, o getOptions) (io.ReadCloser, int64, string, error) {
	if !o.standalone {
		addr := o.proxy
		if addr == "" {
			addr = dialable(cfg.Proxy.Listen)
		}
		body, size, err := getViaProxy(ctx, addr, u, hdr, o.tag)
		var ue *proxyUnreachableError
		if !errors.As(err, &ue) {
			return body, size, "proxy", err
		}
		fmt.Fprintf(cmd.ErrOrStderr(), "starling: the local proxy at %s is unreachable (%v); downloading standalone\n", addr, ue.err)
		slog.Info("local proxy unreachable, falling back to a standalone peer", "proxy", addr, "err", ue.err)
	}
	scheds := o.schedulers
	if !cmd.Flags().Changed("scheduler") {
		scheds = cfg.Peer.Schedulers
	}
	// The proxy's query filters, so that both name a task alike.
	body, size, err := getStandalone(ctx, u, hdr, o.tag, cfg.Proxy.QueryFilters, scheds)
	return body, size, "standalone", err
}

// dialable turns a listen address into one to connect to: an empty or
// unspecified host is this host.
func dialable(listen string) string {
	host, port, err := net.SplitHostPort(listen)
	if err != nil {
		return listen
	}
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		host = "127.0.0.1"
	}
	return net.JoinHostPort(host, port)
}

type proxyUnreachableError struct{ err error }

func (e *proxyUnreachableError) Error() string { return "local proxy unreachable: " + e.err.Error() }

// getViaProxy sends the request in proxy form (absolute URI) over a plain
// TCP connection: that works for https:// URLs too without CONNECT, so the
// proxy sees the URL and can serve it through P2P.
func getViaProxy(ctx context.Context, addr string, u *url.URL, hdr http.Header, tag string) (io.ReadCloser, int64, error) {
	d := net.Dialer{Timeout: proxyDialTimeout}
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		if ctx.Err() != nil {
			return nil, 0, ctx.Err()
		}
		return nil, 0, &proxyUnreachableError{err}
	}
	// A cancelled context (SIGINT) must end a read that waits on the proxy.
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	fail := func(err error) (io.ReadCloser, int64, error) {
		stop()
		conn.Close()
		return nil, 0, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return fail(err)
	}
	req.Header = hdr.Clone()
	if tag != "" {
		req.Header.Set(tagHeader, tag)
	}
	req.Header.Set(useP2PHeader, "true")
	req.Close = true
	bw := bufio.NewWriter(conn)
	if err := req.WriteProxy(bw); err != nil {
		return fail(fmt.Errorf("send to the proxy at %s: %w", addr, err))
	}
	if err := bw.Flush(); err != nil {
		return fail(fmt.Errorf("send to the proxy at %s: %w", addr, err))
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), req)
	if err != nil {
		return fail(fmt.Errorf("read the answer of the proxy at %s: %w", addr, err))
	}
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 300))
		resp.Body.Close()
		line := strings.Join(strings.Fields(string(msg)), " ")
		if line != "" {
			line = ": " + line
		}
		return fail(fmt.Errorf("the proxy at %s answered %s%s", addr, resp.Status, line))
	}
	return &connBody{ReadCloser: resp.Body, conn: conn, stop: stop}, resp.ContentLength, nil
}

type connBody struct {
	io.ReadCloser
	conn net.Conn
	stop func() bool
}

func (b *connBody) Close() error {
	b.stop()
	b.ReadCloser.Close()
	return b.conn.Close()
}

// getStandalone runs a peer in this process for one download: its storage
// is a temporary directory removed afterwards, and it serves no uploads.
func getStandalone(ctx context.Context, u *url.URL, hdr http.Header, tag string, filters, schedulers []string) (io.ReadCloser, int64, error) {
	id, err := taskid.ForURL(u.String(), tag, filters)
	if err != nil {
		return nil, 0, err
	}
	root, err := os.MkdirTemp("", "starling-get-*")
	if err != nil {
		return nil, 0, fmt.Errorf("standalone peer: %w", err)
	}
	p, err := peer.New(peer.Options{Root: root, Schedulers: schedulers, Logger: slog.Default()})
	if err != nil {
		os.RemoveAll(root)
		return nil, 0, fmt.Errorf("standalone peer: %w", err)
	}
	cleanup := func() {
		p.Close()
		os.RemoveAll(root)
	}
	if err := p.Start(ctx); err != nil {
		cleanup()
		return nil, 0, fmt.Errorf("standalone peer: %w", err)
	}
	digest, _ := taskid.RegistryDigest(u)
	d, err := p.Open(ctx, peer.Request{TaskID: id, URL: u.String(), Header: hdr, Digest: digest})
	if err != nil {
		cleanup()
		return nil, 0, err
	}
	rc := d.NewReader(ctx, 0, -1)
	return &standaloneBody{r: rc, close: func() {
		rc.Close()
		d.Close()
		cleanup()
	}}, d.Length(), nil
}

type standaloneBody struct {
	r     io.ReadCloser
	close func()
}

func (b *standaloneBody) Read(p []byte) (int, error) { return b.r.Read(p) }
func (b *standaloneBody) Close() error               { b.close(); return nil }

// parseHeaders reads -H "Key: Value" flags.
func parseHeaders(hs []string) (http.Header, error) {
	h := http.Header{}
	for _, s := range hs {
		k, v, ok := strings.Cut(s, ":")
		k = strings.TrimSpace(k)
		if !ok || k == "" || strings.ContainsAny(k, " \t") {
			return nil, fmt.Errorf("-H %q: want \"Key: Value\"", s)
		}
		h.Add(k, strings.TrimSpace(v))
	}
	return h, nil
}

// newDigester returns the hash of a digest "algo:hex", checking its form.
func newDigester(d string) (hash.Hash, error) {
	algo, hx, ok := strings.Cut(d, ":")
	var h hash.Hash
	switch {
	case !ok:
	case algo == "sha256":
		h = sha256.New()
	case algo == "sha512":
		h = sha512.New()
	}
	if h == nil {
		return nil, fmt.Errorf("%q: want sha256:<hex> or sha512:<hex>", d)
	}
	if b, err := hex.DecodeString(hx); err != nil || len(b) != h.Size() {
		return nil, fmt.Errorf("%q: want %d hex digits after %q", d, 2*h.Size(), algo+":")
	}
	return h, nil
}

// interrupted names a cancelled context (SIGINT, SIGTERM) as such rather
// than as the read error it caused.
func interrupted(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return errors.New("interrupted")
	}
	return err
}
