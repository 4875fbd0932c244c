// pgjdbc through pgway with several connections (run by tests/drivers.rs as
// `java -Duser.timezone=Asia/Tokyo -cp /usr/share/java/postgresql.jar PgjdbcCheck.java`).
//
// prepareThreshold=1 makes pgjdbc switch every PreparedStatement to a named server-side
// statement (S_1, S_2, ...) from its first execution; each statement then runs many times.
// The JVM's time zone (Asia/Tokyo) goes to the server in the StartupMessage (TimeZone).
// Settings come from the environment: PGWAY_HOST, PGWAY_PORT, PGWAY_USER, PGWAY_PASSWORD,
// PGWAY_DB, PRIMARY_PORT, REPLICA_PORT, PREFIX. Exits 1 listing every failed check.

import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.List;
import java.util.Objects;
import java.util.Properties;
import java.util.Set;
import java.util.TreeSet;

public class PgjdbcCheck {
    static final List<String> failures = new ArrayList<>();

    static void eq(String what, Object got, Object want) {
        if (Objects.equals(got, want)) {
            System.out.println("ok   " + what + ": " + got);
        } else {
            String msg = what + ": expected " + want + ", got " + got;
            System.out.println("FAIL " + msg);
            failures.add(msg);
        }
    }

    static String env(String name) {
        String v = System.getenv(name);
        if (v == null) {
            throw new IllegalStateException("environment variable " + name + " is not set");
        }
        return v;
    }

    static List<Object> row(PreparedStatement ps) throws Exception {
        try (ResultSet rs = ps.executeQuery()) {
            if (!rs.next()) {
                throw new AssertionError("no rows");
            }
            List<Object> out = new ArrayList<>();
            for (int i = 1; i <= rs.getMetaData().getColumnCount(); i++) {
                out.add(rs.getObject(i));
            }
            return out;
        }
    }

    static List<Object> row(Connection c, String sql) throws Exception {
        try (PreparedStatement ps = c.prepareStatement(sql)) {
            return row(ps);
        }
    }

    static void run() throws Exception {
        String url = "jdbc:postgresql://" + System.getenv().getOrDefault("PGWAY_HOST", "127.0.0.1") + ":"
                + env("PGWAY_PORT") + "/" + env("PGWAY_DB");
        int primary = Integer.parseInt(env("PRIMARY_PORT"));
        int replica = Integer.parseInt(env("REPLICA_PORT"));
        String t = env("PREFIX") + "_items";
        String schema = env("PREFIX") + "_s";
        Properties props = new Properties();
        props.setProperty("user", env("PGWAY_USER"));
        props.setProperty("password", env("PGWAY_PASSWORD"));
        props.setProperty("prepareThreshold", "1");
        props.setProperty("ApplicationName", "pgway-jdbc");
        props.setProperty("connectTimeout", "10");
        props.setProperty("socketTimeout", "120");
        props.setProperty("sslmode", "disable");

        List<Connection> conns = new ArrayList<>();
        for (int i = 0; i < 3; i++) {
            conns.add(DriverManager.getConnection(url, props));
        }
        try {
            System.out.println("pgjdbc " + conns.get(0).getMetaData().getDriverVersion());
            // One PreparedStatement per connection, run 10 times (server-prepared from the first).
            Set<Integer> ports = new TreeSet<>();
            for (Connection c : conns) {
                try (PreparedStatement ps = c.prepareStatement("select inet_server_port()")) {
                    for (int i = 0; i < 10; i++) {
                        ports.add((Integer) row(ps).get(0));
                    }
                }
            }
            eq("plain reads, 10 per connection: servers", ports, Set.of(replica));

            try (Statement st = conns.get(0).createStatement()) {
                st.execute("create table " + t
                        + " (id int primary key, v text not null, n bigint, f float8, ok bool)");
                st.execute("create schema " + schema);
                st.execute("create table " + schema + ".things (v text)");
                st.execute("insert into " + schema + ".things values ('in-schema')");
            }

            // Inserts: one PreparedStatement per connection, 10 executions each.
            ports.clear();
            String insert = "insert into " + t + " (id, v, n, f, ok) values (?, ?, ?, ?, ?) returning inet_server_port()";
            for (int ci = 0; ci < conns.size(); ci++) {
                try (PreparedStatement ps = conns.get(ci).prepareStatement(insert)) {
                    for (int k = 0; k < 10; k++) {
                        int id = ci * 10 + k;
                        ps.setInt(1, id);
                        ps.setString(2, "v" + id);
                        ps.setLong(3, id * 1_000_000_000L);
                        ps.setDouble(4, id / 4.0);
                        ps.setBoolean(5, id % 2 == 0);
                        ports.add((Integer) row(ps).get(0));
                    }
                }
            }
            eq("30 prepared inserts: servers", ports, Set.of(primary));

            // A batch: many Bind/Execute in one round trip.
            try (PreparedStatement ps = conns.get(1).prepareStatement(
                    "insert into " + t + " (id, v) values (?, ?)")) {
                for (int id = 100; id < 120; id++) {
                    ps.setInt(1, id);
                    ps.setString(2, "b" + id);
                    ps.addBatch();
                }
                int[] counts = ps.executeBatch();
                eq("batch insert: rows", counts.length, 20);
            }

            // Wait for the replica, then read back with one PreparedStatement per connection.
            long deadline = System.currentTimeMillis() + 20_000;
            long count = -1;
            while (System.currentTimeMillis() < deadline) {
                count = (Long) row(conns.get(2), "select count(*) from " + t).get(0);
                if (count == 50) {
                    break;
                }
                Thread.sleep(100);
            }
            eq("rows on the replica", count, 50L);
            ports.clear();
            List<String> got = new ArrayList<>();
            List<String> want = new ArrayList<>();
            for (int round = 0; round < 2; round++) {
                for (Connection c : conns) {
                    try (PreparedStatement ps = c.prepareStatement(
                            "select v, n, f, ok, inet_server_port() from " + t + " where id = ?")) {
                        for (int id = 0; id < 30; id++) {
                            ps.setInt(1, id);
                            List<Object> r = row(ps);
                            got.add(r.subList(0, 4).toString());
                            want.add(List.of("v" + id, id * 1_000_000_000L, id / 4.0, id % 2 == 0).toString());
                            ports.add((Integer) r.get(4));
                        }
                    }
                }
            }
            eq("180 prepared selects: values", got, want);
            eq("180 prepared selects: servers", ports, Set.of(replica));

            // A transaction runs on the primary.
            Connection tx = conns.get(0);
            tx.setAutoCommit(false);
            List<Object> r = row(tx, "select count(*), inet_server_port() from " + t);
            tx.commit();
            tx.setAutoCommit(true);
            eq("transaction: (count, server)", r, List.of(50L, primary));

            // Startup parameters: ApplicationName and the JVM's TimeZone, on a read and a write.
            Connection c2 = conns.get(2);
            eq("application_name on a read",
                    row(c2, "select current_setting('application_name'), inet_server_port()"),
                    List.of("pgway-jdbc", replica));
            eq("application_name on a write",
                    row(c2, "insert into " + t + " (id, v) values (1000, 'app') "
                            + "returning current_setting('application_name'), inet_server_port()"),
                    List.of("pgway-jdbc", primary));
            eq("SHOW TimeZone", row(c2, "show timezone").get(0), "Asia/Tokyo");
            for (String sql : new String[] {"select now()::text", "select now()::text, txid_current()"}) {
                String now = (String) row(c2, sql).get(0);
                eq("`" + sql + "` has the +09 offset of the startup TimeZone", now.endsWith("+09"), true);
            }

            // SET search_path on one connection sticks to it; the others keep theirs.
            Connection c1 = conns.get(1);
            try (Statement st = c1.createStatement()) {
                st.execute("set search_path = " + schema + ", public");
            }
            deadline = System.currentTimeMillis() + 20_000;
            while (System.currentTimeMillis() < deadline
                    && (Long) row(conns.get(0), "select count(*) from " + schema + ".things").get(0) < 1) {
                Thread.sleep(100);
            }
            try (PreparedStatement read = c1.prepareStatement(
                    "select v, current_setting('search_path'), inet_server_port() from things");
                    PreparedStatement write = c1.prepareStatement(
                            "insert into things values (?) returning v, inet_server_port()")) {
                for (int i = 0; i < 10; i++) {
                    for (Connection other : List.of(conns.get(0), conns.get(2))) {
                        eq(i + ": other connection's search_path", row(other, "show search_path").get(0),
                                "\"$user\", public");
                        row(other, "update " + t + " set n = n where id = 1 returning id");
                    }
                    eq(i + ": read after SET search_path", row(read),
                            List.of("in-schema", schema + ", public", replica));
                    write.setString(1, "j" + i);
                    eq(i + ": write after SET search_path", row(write), List.of("j" + i, primary));
                }
            }
        } finally {
            for (Connection c : conns) {
                c.close();
            }
        }
    }

    public static void main(String[] args) {
        try {
            run();
        } catch (Throwable e) {
            e.printStackTrace(System.out);
            failures.add("exception: " + e);
        }
        if (!failures.isEmpty()) {
            System.out.println("\npgjdbc: " + failures.size() + " check(s) failed:");
            for (String f : failures) {
                System.out.println("  - " + f);
            }
            System.exit(1);
        }
        System.out.println("\npgjdbc: all checks passed");
    }
}
