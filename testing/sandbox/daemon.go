package sandbox

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"slices"
	"sort"
	"strings"
	"syscall"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/wait"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	"k8s.io/client-go/util/retry"
)

func writeKubeconfig(path, server, caFile, certFile, keyFile, token string) error {
	ca, err := os.ReadFile(caFile)
	if err != nil {
		return err
	}
	user := &clientcmdapi.AuthInfo{ClientCertificate: certFile, ClientKey: keyFile, Token: token}
	cfg := clientcmdapi.Config{
		Clusters:       map[string]*clientcmdapi.Cluster{"sandbox": {Server: server, CertificateAuthorityData: ca}},
		AuthInfos:      map[string]*clientcmdapi.AuthInfo{"user": user},
		Contexts:       map[string]*clientcmdapi.Context{"sandbox": {Cluster: "sandbox", AuthInfo: "user"}},
		CurrentContext: "sandbox",
	}
	return clientcmd.WriteToFile(cfg, path)
}

// manifestObjects decodes every object of a file in manifests/.
func manifestObjects(name string) ([]runtime.Object, error) {
	return manifestObjectsAt("", name)
}

// manifestObjectsAt decodes every object of manifests/name at commit ("":
// the checkout's working tree).
func manifestObjectsAt(commit, name string) ([]runtime.Object, error) {
	data, err := ReleaseManifest(commit, name)
	if err != nil {
		return nil, err
	}
	dec := utilyaml.NewYAMLReader(bufioReader(data))
	var out []runtime.Object
	for {
		doc, err := dec.Read()
		if err != nil {
			break
		}
		if len(bytes.TrimSpace(doc)) == 0 {
			continue
		}
		obj, _, err := scheme.Codecs.UniversalDeserializer().Decode(doc, nil, nil)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		out = append(out, obj)
	}
	return out, nil
}

// applyRBAC creates what manifests/rbac.yaml holds, exactly as written: a
// missing verb there makes the daemon fail here.
func (c *Cluster) applyRBAC(ctx context.Context) error {
	objs, err := manifestObjects("rbac.yaml")
	if err != nil {
		return err
	}
	return c.applyRBACObjects(ctx, objs, false)
}

// applyRBACObjects creates RBAC manifest objects. With merge, an object
// that exists is kept and widened: a Role or ClusterRole gets the rules it
// lacks, a binding the subjects it lacks.
func (c *Cluster) applyRBACObjects(ctx context.Context, objs []runtime.Object, merge bool) error {
	for _, o := range objs {
		var err error
		switch v := o.(type) {
		case *corev1.Namespace:
			_, err = c.Admin.CoreV1().Namespaces().Create(ctx, v, metav1.CreateOptions{})
		case *corev1.ServiceAccount:
			_, err = c.Admin.CoreV1().ServiceAccounts(v.Namespace).Create(ctx, v, metav1.CreateOptions{})
		case *rbacv1.ClusterRole:
			if _, err = c.Admin.RbacV1().ClusterRoles().Create(ctx, v, metav1.CreateOptions{}); merge && apierrors.IsAlreadyExists(err) {
				err = retry.RetryOnConflict(retry.DefaultRetry, func() error {
					cur, err := c.Admin.RbacV1().ClusterRoles().Get(ctx, v.Name, metav1.GetOptions{})
					if err != nil {
						return err
					}
					cur.Rules = mergeRules(cur.Rules, v.Rules)
					_, err = c.Admin.RbacV1().ClusterRoles().Update(ctx, cur, metav1.UpdateOptions{})
					return err
				})
			}
		case *rbacv1.ClusterRoleBinding:
			if _, err = c.Admin.RbacV1().ClusterRoleBindings().Create(ctx, v, metav1.CreateOptions{}); merge && apierrors.IsAlreadyExists(err) {
				err = retry.RetryOnConflict(retry.DefaultRetry, func() error {
					cur, err := c.Admin.RbacV1().ClusterRoleBindings().Get(ctx, v.Name, metav1.GetOptions{})
					if err != nil {
						return err
					}
					if cur.RoleRef != v.RoleRef {
						return fmt.Errorf("ClusterRoleBinding %s: roleRef %v, the manifest has %v", v.Name, cur.RoleRef, v.RoleRef)
					}
					cur.Subjects = mergeSubjects(cur.Subjects, v.Subjects)
					_, err = c.Admin.RbacV1().ClusterRoleBindings().Update(ctx, cur, metav1.UpdateOptions{})
					return err
				})
			}
		case *rbacv1.Role:
			if _, err = c.Admin.RbacV1().Roles(v.Namespace).Create(ctx, v, metav1.CreateOptions{}); merge && apierrors.IsAlreadyExists(err) {
				err = retry.RetryOnConflict(retry.DefaultRetry, func() error {
					cur, err := c.Admin.RbacV1().Roles(v.Namespace).Get(ctx, v.Name, metav1.GetOptions{})
					if err != nil {
						return err
					}
					cur.Rules = mergeRules(cur.Rules, v.Rules)
					_, err = c.Admin.RbacV1().Roles(v.Namespace).Update(ctx, cur, metav1.UpdateOptions{})
					return err
				})
			}
		case *rbacv1.RoleBinding:
			if _, err = c.Admin.RbacV1().RoleBindings(v.Namespace).Create(ctx, v, metav1.CreateOptions{}); merge && apierrors.IsAlreadyExists(err) {
				err = retry.RetryOnConflict(retry.DefaultRetry, func() error {
					cur, err := c.Admin.RbacV1().RoleBindings(v.Namespace).Get(ctx, v.Name, metav1.GetOptions{})
					if err != nil {
						return err
					}
					if cur.RoleRef != v.RoleRef {
						return fmt.Errorf("RoleBinding %s/%s: roleRef %v, the manifest has %v", v.Namespace, v.Name, cur.RoleRef, v.RoleRef)
					}
					cur.Subjects = mergeSubjects(cur.Subjects, v.Subjects)
					_, err = c.Admin.RbacV1().RoleBindings(v.Namespace).Update(ctx, cur, metav1.UpdateOptions{})
					return err
				})
			}
		default:
			err = fmt.Errorf("rbac.yaml: unexpected %T", o)
		}
		if merge && apierrors.IsAlreadyExists(err) {
			err = nil // a Namespace or ServiceAccount: nothing to widen
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// mergeRules returns have with the rules of add it lacks appended: the
// union of two rule lists, in which a rule equal to one in have is not
// repeated.
func mergeRules(have, add []rbacv1.PolicyRule) []rbacv1.PolicyRule {
	out := slices.Clone(have)
	for _, r := range add {
		if !slices.ContainsFunc(out, func(h rbacv1.PolicyRule) bool { return equality.Semantic.DeepEqual(h, r) }) {
			out = append(out, r)
		}
	}
	return out
}

// mergeSubjects returns have with the subjects of add it lacks appended.
func mergeSubjects(have, add []rbacv1.Subject) []rbacv1.Subject {
	out := slices.Clone(have)
	for _, s := range add {
		if !slices.Contains(out, s) {
			out = append(out, s)
		}
	}
	return out
}

// daemonSpec reads the DaemonSet of manifests/daemonset.yaml.
func daemonSpec() (*appsv1.DaemonSet, error) { return daemonSpecAt("") }

// daemonSpecAt reads the DaemonSet of manifests/daemonset.yaml at commit
// ("": the working tree).
func daemonSpecAt(commit string) (*appsv1.DaemonSet, error) {
	objs, err := manifestObjectsAt(commit, "daemonset.yaml")
	if err != nil {
		return nil, err
	}
	for _, o := range objs {
		if ds, ok := o.(*appsv1.DaemonSet); ok {
			return ds, nil
		}
	}
	return nil, fmt.Errorf("no DaemonSet in manifests/daemonset.yaml at %s", describeCommit(commit))
}

// installDaemon applies the RBAC, gets the ServiceAccount a token through
// the TokenRequest API and starts egressvip in every node namespace.
func (c *Cluster) installDaemon(ctx context.Context) error {
	if err := c.applyRBAC(ctx); err != nil {
		return fmt.Errorf("apply manifests/rbac.yaml: %w", err)
	}
	ds, err := daemonSpec()
	if err != nil {
		return err
	}
	sa := ds.Spec.Template.Spec.ServiceAccountName
	// The serviceaccount controller makes "default" in each namespace;
	// pods need it.
	if err := wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, 60*time.Second, true, func(ctx context.Context) (bool, error) {
		_, err := c.Admin.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{})
		return err == nil, nil
	}); err != nil {
		return fmt.Errorf("no default ServiceAccount: %w", err)
	}
	expiry := int64(6 * 3600)
	tr, err := c.Admin.CoreV1().ServiceAccounts(ds.Namespace).CreateToken(ctx, sa,
		&authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: &expiry}}, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("token for %s/%s: %w", ds.Namespace, sa, err)
	}
	c.daemonK = c.path("egressvip.kubeconfig")
	if err := writeKubeconfig(c.daemonK, "https://"+apiServerIP+":6443", c.path("ca.crt"), "", "", tr.Status.Token); err != nil {
		return err
	}
	for _, n := range c.Nodes {
		if err := c.startDaemon(n); err != nil {
			return err
		}
	}
	for _, n := range c.Nodes {
		if err := c.WaitDaemonReady(n, daemonReadyLimit); err != nil {
			return err
		}
	}
	return nil
}

// DaemonEnv is the environment egressvip gets on node n: the DaemonSet's
// env with the downward API filled in, the sandbox's overrides and the
// ServiceAccount kubeconfig.
func (c *Cluster) DaemonEnv(n *Node) ([]string, error) { return c.ReleaseDaemonEnv(n, "") }

// ReleaseDaemonEnv is DaemonEnv with the DaemonSet of manifests/ at commit
// ("": the working tree): the environment that release's manifests give
// its daemon on n.
func (c *Cluster) ReleaseDaemonEnv(n *Node, commit string) ([]string, error) {
	ds, err := daemonSpecAt(commit)
	if err != nil {
		return nil, err
	}
	return c.envOf(n, ds, describeCommit(commit))
}

// DaemonSetEnv is the environment egressvip gets on node n from a given
// DaemonSet (the one the Helm chart renders, say), as DaemonEnv gives it
// from manifests/.
func (c *Cluster) DaemonSetEnv(n *Node, ds *appsv1.DaemonSet) ([]string, error) {
	return c.envOf(n, ds, "DaemonSet "+ds.Namespace+"/"+ds.Name)
}

// DaemonBinary is the egressvip binary the sandbox built from this
// checkout.
func (c *Cluster) DaemonBinary() string { return c.bins.EgressVIP }

// envOf is the environment of the container of ds on node n.
func (c *Cluster) envOf(n *Node, ds *appsv1.DaemonSet, what string) ([]string, error) {
	commit := what
	env := map[string]string{}
	for _, e := range ds.Spec.Template.Spec.Containers[0].Env {
		switch {
		case e.ValueFrom == nil:
			env[e.Name] = e.Value
		case e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "spec.nodeName":
			env[e.Name] = n.Name
		case e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "metadata.namespace":
			env[e.Name] = ds.Namespace
		default:
			return nil, fmt.Errorf("%s: env %s: the sandbox cannot fill this valueFrom", commit, e.Name)
		}
	}
	for k, v := range c.opts.DaemonEnv {
		env[k] = v
	}
	n.mu.Lock()
	for k, v := range n.env {
		env[k] = v
	}
	n.mu.Unlock()
	env["KUBECONFIG"] = c.daemonK
	env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"
	out := make([]string, 0, len(env))
	for k, v := range env {
		out = append(out, k+"="+v)
	}
	sort.Strings(out)
	return out, nil
}

// SetDaemonEnv overrides variables of n's egressvip from its next start
// on (nil values restore the cluster's); restart the daemon to apply.
func (c *Cluster) SetDaemonEnv(n *Node, env map[string]string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.env = env
}

// StartDaemon starts egressvip (the checkout's build) in n's namespace
// with DaemonEnv, appending to its log, and waits until its /readyz says
// ok: what follows finds it serving (a scenario that starts right after
// another one restarted a daemon would otherwise race its start).
func (c *Cluster) StartDaemon(n *Node) error {
	if err := c.startDaemon(n); err != nil {
		return err
	}
	return c.WaitDaemonReady(n, daemonReadyLimit)
}

func (c *Cluster) startDaemon(n *Node) error {
	env, err := c.DaemonEnv(n)
	if err != nil {
		return err
	}
	return c.StartDaemonWith(n, c.bins.EgressVIP, env)
}

// daemonReadyLimit bounds the wait for a daemon's /readyz: a bound on a
// hang, not a performance figure.
const daemonReadyLimit = time.Minute

// WaitDaemonReady waits at most limit until n's egressvip answers its
// /readyz (port 2112) with 200.
func (c *Cluster) WaitDaemonReady(n *Node, limit time.Duration) error {
	client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DialContext: DialIn(n.NS), DisableKeepAlives: true}}
	deadline := time.Now().Add(limit)
	last := ""
	for {
		resp, err := client.Get("http://127.0.0.1:2112/readyz")
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			last = resp.Status + " " + strings.TrimSpace(string(body))
		} else {
			last = err.Error()
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("egressvip on %s not ready after %v: %s (log: %s)", n.Name, limit, last, n.LogPath)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// StartDaemonWith starts binary as n's egressvip with exactly env (see
// ReleaseDaemonEnv and BuildRelease), appending to the same log as
// StartDaemon; StopDaemon stops it.
func (c *Cluster) StartDaemonWith(n *Node, binary string, env []string) error {
	n.mu.Lock()
	running := n.daemon != nil
	if running {
		select {
		case <-n.exited:
			running = false
		default:
		}
	}
	n.mu.Unlock()
	if running {
		return fmt.Errorf("egressvip already runs on %s (StopDaemon first)", n.Name)
	}
	n.LogPath = c.path("egressvip-" + n.Name + ".log")
	logFile, err := os.OpenFile(n.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	fmt.Fprintf(logFile, "=== sandbox: %s run at %s\n", binary, time.Now().Format(time.RFC3339Nano))
	cmd := exec.Command("ip", "netns", "exec", n.NS, binary, "run")
	cmd.Env = env
	exited, err := startLogging(cmd, logFile)
	if err != nil {
		return err
	}
	n.mu.Lock()
	n.daemon, n.exited = cmd, exited
	n.mu.Unlock()
	return nil
}

// StopDaemon sends sig to n's egressvip and waits for it to exit; it
// returns the exit code.
func (c *Cluster) StopDaemon(n *Node, sig syscall.Signal) (int, error) {
	n.mu.Lock()
	cmd, exited := n.daemon, n.exited
	n.daemon = nil
	n.mu.Unlock()
	if cmd == nil {
		return 0, fmt.Errorf("no daemon running on %s", n.Name)
	}
	_ = cmd.Process.Signal(sig)
	select {
	case <-exited:
	case <-time.After(30 * time.Second):
		_ = cmd.Process.Kill()
		<-exited
		return -1, fmt.Errorf("egressvip on %s did not exit within 30 s of %s", n.Name, sig)
	}
	return cmd.ProcessState.ExitCode(), nil
}

// Cleanup runs `egressvip cleanup` in n's namespace with the DaemonSet env.
func (c *Cluster) Cleanup(n *Node) (string, error) {
	env, err := c.DaemonEnv(n)
	if err != nil {
		return "", err
	}
	cmd := exec.Command("ip", "netns", "exec", n.NS, c.bins.EgressVIP, "cleanup")
	cmd.Env = env
	out, err := cmd.CombinedOutput()
	return string(out), err
}
