package dev.edgelm.bundle;

import java.util.regex.Matcher;
import java.util.regex.Pattern;

/** A release number such as 1.5.1 (suffixes such as "+cpu" or "rc1" are ignored). */
public final class Version implements Comparable<Version> {
    private static final Pattern NUMBERS = Pattern.compile("(\\d+)(?:\\.(\\d+))?(?:\\.(\\d+))?");

    public final int major;
    public final int minor;
    public final int patch;

    public Version(int major, int minor, int patch) {
        this.major = major;
        this.minor = minor;
        this.patch = patch;
    }

    public static Version parse(String text) throws BundleException {
        Matcher m = NUMBERS.matcher(text == null ? "" : text.trim());
        if (!m.lookingAt()) throw new BundleException("not a version number: '" + text + "'");
        return new Version(Integer.parseInt(m.group(1)), m.group(2) == null ? 0 : Integer.parseInt(m.group(2)),
                m.group(3) == null ? 0 : Integer.parseInt(m.group(3)));
    }

    /**
     * Whether a runtime of this version reads files a runtime of {@code checked} ran: the same
     * major release, and not older (the vendors promise backward, not forward, compatibility:
     * ExecuTorch says so of .pte files); below 1.0 the minor release must match too, since the
     * 0.x libraries change their file formats between minor releases.
     */
    public boolean runs(Version checked) {
        if (major != checked.major || (major == 0 && minor != checked.minor)) return false;
        return compareTo(checked) >= 0;
    }

    @Override
    public int compareTo(Version o) {
        if (major != o.major) return Integer.compare(major, o.major);
        if (minor != o.minor) return Integer.compare(minor, o.minor);
        return Integer.compare(patch, o.patch);
    }

    @Override
    public boolean equals(Object o) {
        return o instanceof Version && compareTo((Version) o) == 0;
    }

    @Override
    public int hashCode() {
        return (major * 1000 + minor) * 1000 + patch;
    }

    @Override
    public String toString() {
        return major + "." + minor + "." + patch;
    }
}
