package main

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/BurntSushi/toml"
	"github.com/spf13/cobra"
)

func init() { subcommands = append(subcommands, newSetupCmd) }

func newSetupCmd() *cobra.Command {
	setup := &cobra.Command{Use: "setup", Short: "Configure other software to use starling"}
	var write bool
	var path string
	ctd := &cobra.Command{
		Use:   "containerd",
		Short: "Print (or with --write install) containerd's configuration for starling",
		Long: `Print the containerd configuration that loads starlingd as the proxy
snapshotter "starling" and makes the CRI plugin (Kubernetes) use it, with
snapshot annotations passed on so that layers can be mounted lazily.
With --write the keys are merged into containerd's configuration file (the
old file is kept as FILE.bak); restart containerd afterwards.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := loadConfig(cmd)
			if err != nil {
				return err
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
				return toml.NewEncoder(os.Stdout).Encode(want)
			}
			cur := map[string]any{}
			old, err := os.ReadFile(path)
			switch {
			case err == nil:
				if _, err := toml.Decode(string(old), &cur); err != nil {
					return fmt.Errorf("parse %s: %w", path, err)
				}
				if v, ok := cur["version"].(int64); ok && v != 2 {
					return fmt.Errorf("%s is configuration version %d; only version 2 is supported", path, v)
				}
			case errors.Is(err, fs.ErrNotExist):
			default:
				return err
			}
			merge(cur, want)
			var buf bytes.Buffer
			if err := toml.NewEncoder(&buf).Encode(cur); err != nil {
				return err
			}
			if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
				return err
			}
			if old != nil {
				if err := os.WriteFile(path+".bak", old, 0o644); err != nil {
					return err
				}
			}
			tmp := path + ".tmp"
			if err := os.WriteFile(tmp, buf.Bytes(), 0o644); err != nil {
				return err
			}
			if err := os.Rename(tmp, path); err != nil {
				return err
			}
			fmt.Printf("wrote %s; restart containerd to load the starling snapshotter\n", path)
			return nil
		},
	}
	ctd.Flags().BoolVar(&write, "write", false, "merge the settings into containerd's configuration file")
	ctd.Flags().StringVar(&path, "config-path", "/etc/containerd/config.toml", "containerd's configuration file")
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
