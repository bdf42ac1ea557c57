package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/BurntSushi/toml"
	"github.com/spf13/cobra"

	"github.com/starling-dev/starling/pkg/config"
	"github.com/starling-dev/starling/pkg/proxy"
)

func init() { subcommands = append(subcommands, newSetupCmd) }

func newSetupCmd() *cobra.Command {
	setup := &cobra.Command{Use: "setup", Short: "Configure other software to use starling"}
	var write bool
	var path string
	var mo mirrorOptions
	ctd := &cobra.Command{
		Use:   "containerd",
		Short: "Print (or with --write install) containerd's configuration for starling",
		Long: `Print the containerd configuration that loads starlingd as the proxy
snapshotter "starling" and makes the CRI plugin (Kubernetes) use it, with
snapshot annotations passed on so that layers can be mounted lazily.
With --write the keys are merged into containerd's configuration file (the
old file is kept as FILE.bak); restart containerd afterwards.

With --mirror, instead, write the registry host files (hosts.toml) that make
containerd pull through starlingd's P2P registry mirror: one per --registry
(default _default, which containerd 1.7 and newer read for every registry;
containerd 1.6 needs each registry named), under --hosts-dir, and the CRI
plugin's config_path pointing there. Files that already say the same are
left alone; others are kept as FILE.bak.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := loadConfig(cmd)
			if err != nil {
				return err
			}
			if mo.enable {
				mo.write, mo.configPath = write, path
				mo.hostsDirSet = cmd.Flags().Changed("hosts-dir")
				return setupMirror(cmd.OutOrStdout(), cmd.ErrOrStderr(), cfg, mo)
			}
			want := map[string]any{
				"version": int64(2),
				"proxy_plugins": map[string]any{
					"starling": map[string]any{"type": "snapshot", "address": cfg.Snapshotter.Address},
				},
				"plugins": map[string]any{
					"io.containerd.grpc.v1.cri": map[string]any{
						"containerd": map[string]any{
							"snapshotter":                  "starling",
							"disable_snapshot_annotations": false,
						},
					},
				},
			}
			if !write {
				return toml.NewEncoder(cmd.OutOrStdout()).Encode(want)
			}
			cur, err := readContainerdConfig(path)
			if err != nil {
				return err
			}
			merge(cur, want)
			var buf bytes.Buffer
			if err := toml.NewEncoder(&buf).Encode(cur); err != nil {
				return err
			}
			if _, err := replaceFile(path, buf.Bytes()); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "wrote %s; restart containerd to load the starling snapshotter\n", path)
			return nil
		},
	}
	ctd.Flags().BoolVar(&write, "write", false, "merge the settings into containerd's configuration file")
	ctd.Flags().StringVar(&path, "config-path", "/etc/containerd/config.toml", "containerd's configuration file")
	ctd.Flags().BoolVar(&mo.enable, "mirror", false, "write registry host files that pull through starling's registry mirror")
	ctd.Flags().StringArrayVar(&mo.registries, "registry", []string{proxy.DefaultHosts}, "with --mirror: a registry host[:port] to pull through the mirror (repeatable)")
	ctd.Flags().StringVar(&mo.address, "mirror-address", "", "with --mirror: the mirror's address (default: the configuration's proxy.listen)")
	ctd.Flags().StringVar(&mo.hostsDir, "hosts-dir", "/etc/containerd/certs.d", "with --mirror: containerd's registry hosts directory (its config_path)")
	setup.AddCommand(ctd)
	return setup
}

// merge sets every key of src in dst, recursing into tables.
func merge(dst, src map[string]any) {
	for k, v := range src {
		if sm, ok := v.(map[string]any); ok {
			dm, ok := dst[k].(map[string]any)
			if !ok {
				dm = map[string]any{}
				dst[k] = dm
			}
			merge(dm, sm)
			continue
		}
		dst[k] = v
	}
}

// readContainerdConfig parses containerd's configuration file (empty when
// there is none); only version 2 is understood.
func readContainerdConfig(path string) (map[string]any, error) {
	cur := map[string]any{}
	old, err := os.ReadFile(path)
	switch {
	case err == nil:
		if _, err := toml.Decode(string(old), &cur); err != nil {
			return nil, fmt.Errorf("parse %s: %w", path, err)
		}
		if v, ok := cur["version"].(int64); ok && v != 2 {
			return nil, fmt.Errorf("%s is configuration version %d; only version 2 is supported", path, v)
		}
	case errors.Is(err, fs.ErrNotExist):
	default:
		return nil, err
	}
	return cur, nil
}

// replaceFile writes data to path unless it already holds exactly that; a
// different old file is kept as path.bak. It reports whether it wrote.
func replaceFile(path string, data []byte) (bool, error) {
	old, err := os.ReadFile(path)
	switch {
	case err == nil:
		if bytes.Equal(old, data) {
			return false, nil
		}
		if err := os.WriteFile(path+".bak", old, 0o644); err != nil {
			return false, err
		}
	case !errors.Is(err, fs.ErrNotExist):
		return false, err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return false, err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		return false, err
	}
	return true, os.Rename(tmp, path)
}

// criPlugin is the CRI plugin's name in a version 2 configuration.
const criPlugin = "io.containerd.grpc.v1.cri"

type mirrorOptions struct {
	enable      bool
	registries  []string
	address     string
	hostsDir    string
	hostsDirSet bool
	write       bool
	configPath  string
}

// criRegistry is the CRI plugin's registry table of a parsed configuration.
func criRegistry(cur map[string]any) map[string]any {
	plugins, _ := cur["plugins"].(map[string]any)
	cri, _ := plugins[criPlugin].(map[string]any)
	reg, _ := cri["registry"].(map[string]any)
	return reg
}

// setupMirror writes (or prints) a hosts.toml per registry that sends
// containerd's pulls through the mirror, and points the CRI plugin's
// config_path at their directory.
func setupMirror(out, errw io.Writer, cfg config.Daemon, o mirrorOptions) error {
	addr := o.address
	if addr == "" {
		addr = cfg.Proxy.Listen
	}
	mirror, err := proxy.MirrorURL(addr)
	if err != nil {
		return err
	}
	// The scheme containerd reaches each registry with when the mirror
	// fails over to it: as starling's own clients do.
	scheme := func(host string) string { return cfg.Resolver.Endpoint(host).Scheme() }
	cur, err := readContainerdConfig(o.configPath)
	if err != nil {
		return err
	}
	reg := criRegistry(cur)
	hostsDir := o.hostsDir
	if p, _ := reg["config_path"].(string); p != "" && !o.hostsDirSet {
		// containerd already reads a hosts directory: add to it.
		hostsDir = p
	}
	if _, ok := reg["mirrors"]; ok {
		// containerd refuses config_path beside the old mirrors table.
		return fmt.Errorf("%s sets plugins.%q.registry.mirrors, which containerd does not allow beside config_path: move those mirrors to hosts.toml files under %s first", o.configPath, criPlugin, hostsDir)
	}
	var hosts []string
	seen := map[string]bool{}
	for _, h := range o.registries {
		h = strings.TrimSpace(h)
		if h == "" || strings.ContainsAny(h, "/\\ ") || h == "." || h == ".." {
			return fmt.Errorf("--registry %q: want a registry host[:port] or %s", h, proxy.DefaultHosts)
		}
		if !seen[h] {
			seen[h] = true
			hosts = append(hosts, h)
		}
	}
	if seen[proxy.DefaultHosts] {
		warnOldContainerd(errw)
	}
	if !o.write {
		for _, h := range hosts {
			fmt.Fprintf(out, "# %s\n%s\n", filepath.Join(hostsDir, h, "hosts.toml"), proxy.HostsTOML(h, mirror, scheme))
		}
		fmt.Fprintf(out, "# %s (for the CRI plugin; ctr takes --hosts-dir %s instead)\n[plugins.%q.registry]\n  config_path = %q\n", o.configPath, hostsDir, criPlugin, hostsDir)
		return nil
	}
	for _, h := range hosts {
		p := filepath.Join(hostsDir, h, "hosts.toml")
		wrote, err := replaceFile(p, proxy.HostsTOML(h, mirror, scheme))
		if err != nil {
			return fmt.Errorf("write %s: %w", p, err)
		}
		if wrote {
			fmt.Fprintf(out, "wrote %s: pulls from %s go through %s\n", p, h, mirror)
		} else {
			fmt.Fprintf(out, "%s is up to date\n", p)
		}
	}
	if p, _ := reg["config_path"].(string); p == hostsDir {
		fmt.Fprintf(out, "%s already reads %s; containerd reads hosts.toml at every pull, no restart needed\n", o.configPath, hostsDir)
		return nil
	}
	merge(cur, map[string]any{
		"version": int64(2),
		"plugins": map[string]any{criPlugin: map[string]any{"registry": map[string]any{"config_path": hostsDir}}},
	})
	var buf bytes.Buffer
	if err := toml.NewEncoder(&buf).Encode(cur); err != nil {
		return err
	}
	if _, err := replaceFile(o.configPath, buf.Bytes()); err != nil {
		return fmt.Errorf("write %s: %w", o.configPath, err)
	}
	fmt.Fprintf(out, "wrote %s: config_path = %q; restart containerd to load it\n", o.configPath, hostsDir)
	return nil
}

// warnOldContainerd says so when the containerd on PATH is older than 1.7,
// which reads no _default hosts directory: its pulls would not use the mirror.
func warnOldContainerd(errw io.Writer) {
	out, err := exec.Command("containerd", "--version").Output()
	if err != nil {
		return
	}
	if major, minor, ok := containerdVersion(string(out)); ok && major == 1 && minor < 7 {
		fmt.Fprintf(errw, "warning: containerd %d.%d reads no %s hosts directory (1.7 and newer do): name each registry to pull through the mirror with --registry (docker.io, ...)\n", major, minor, proxy.DefaultHosts)
	}
}

// containerdVersion finds major.minor in `containerd --version`'s output,
// e.g. "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1".
func containerdVersion(s string) (major, minor int, ok bool) {
	f := strings.Fields(s)
	if len(f) < 3 {
		return 0, 0, false
	}
	parts := strings.SplitN(strings.TrimPrefix(f[2], "v"), ".", 3)
	if len(parts) < 2 {
		return 0, 0, false
	}
	var err1, err2 error
	major, err1 = strconv.Atoi(parts[0])
	minor, err2 = strconv.Atoi(parts[1])
	return major, minor, err1 == nil && err2 == nil
}
