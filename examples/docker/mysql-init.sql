-- Demo database for docker-compose.yml (MySQL): a shop, and a least-privilege CDC user.
CREATE TABLE shop.customers (id int AUTO_INCREMENT PRIMARY KEY, name varchar(100) NOT NULL, email varchar(255));
CREATE TABLE shop.orders (id int AUTO_INCREMENT PRIMARY KEY, customer_id int, total decimal(10,2),
                          status varchar(20) DEFAULT 'new', created_at timestamp(3) DEFAULT CURRENT_TIMESTAMP(3));
CREATE USER 'cdc'@'%' IDENTIFIED BY 'cdc';
-- REPLICATION SLAVE: the binlog stream; REPLICATION CLIENT: positions and GTIDs; SELECT: the
-- snapshot and the catalog; RELOAD only for the global-read-lock fallback (no GTIDs, not MariaDB).
GRANT REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO 'cdc'@'%';
GRANT SELECT ON shop.* TO 'cdc'@'%';
